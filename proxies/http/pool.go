package httpproxy

import (
	"bufio"
	"io"
	"sync"
)

// Connection buffers are pooled: a new sandbox connection should not cost
// ~100 KiB of fresh allocations, and the hot path allocates nothing per
// connection. Everything taken is returned by conn.finish, after every
// goroutine that used it has ended.
var (
	readerPools = map[int]*sync.Pool{
		minClientReader:    {New: func() any { return bufio.NewReaderSize(nil, minClientReader) }},
		upstreamReaderSize: {New: func() any { return bufio.NewReaderSize(nil, upstreamReaderSize) }},
	}
	writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writerSize) }}
	bufferPool = sync.Pool{New: func() any { b := make([]byte, copyBufferSize); return &b }}
)

// getReader returns a reader of size on r, pooled for the default sizes.
func getReader(r io.Reader, size int) *bufio.Reader {
	p, ok := readerPools[size]
	if !ok {
		return bufio.NewReaderSize(r, size)
	}
	br := p.Get().(*bufio.Reader)
	br.Reset(r)
	return br
}

func putReader(br *bufio.Reader) {
	if br == nil {
		return
	}
	if p, ok := readerPools[br.Size()]; ok {
		br.Reset(nil)
		p.Put(br)
	}
}

func getWriter(w io.Writer) *bufio.Writer {
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(w)
	return bw
}

func putWriter(bw *bufio.Writer) {
	if bw != nil {
		bw.Reset(nil)
		writerPool.Put(bw)
	}
}

func getBuffer() *[]byte { return bufferPool.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if b != nil {
		bufferPool.Put(b)
	}
}

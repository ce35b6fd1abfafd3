package tcpproxy

import (
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// pipe is the kernel buffer a spliced direction moves bytes through.
// Pipes are pooled (two descriptors and a resize per bulk direction
// otherwise); one the garbage collector drops from the pool is closed by
// its cleanup.
type pipe struct {
	pipeFDs
	asked   int // the size last asked for
	size    int // capacity in bytes
	data    int // bytes in the pipe
	cleanup runtime.Cleanup
}

type pipeFDs struct{ r, w int }

func (f pipeFDs) close() {
	unix.Close(f.r)
	unix.Close(f.w)
}

var pipePool sync.Pool

// getPipe returns an empty pipe of at least size bytes (when the kernel
// allows it; the pipe's size says what it has).
func getPipe(size int) (*pipe, error) {
	p, _ := pipePool.Get().(*pipe)
	if p == nil {
		var fds [2]int
		if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			return nil, err
		}
		p = &pipe{pipeFDs: pipeFDs{r: fds[0], w: fds[1]}}
		p.cleanup = runtime.AddCleanup(p, pipeFDs.close, p.pipeFDs)
	}
	if p.asked != size {
		got, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, size)
		if err != nil {
			// Over /proc/sys/fs/pipe-max-size: keep what the pipe has.
			got, err = unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
		}
		if err != nil {
			p.destroy()
			return nil, err
		}
		p.asked, p.size = size, got
	}
	return p, nil
}

// put returns an empty pipe to the pool and closes one with bytes left in
// it (its flow ended on an error).
func (p *pipe) put() {
	if p.data != 0 {
		p.destroy()
		return
	}
	pipePool.Put(p)
}

func (p *pipe) destroy() {
	p.cleanup.Stop()
	p.pipeFDs.close()
}

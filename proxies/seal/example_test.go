package seal_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/cleanwall/cleanwall/proxies/seal"
)

// dataKey stands in for what the key broker released (a proxy has it from
// its flow's KeySource).
var dataKey = bytes.Repeat([]byte{0x42}, seal.KeySize)

// keysFor is the opener's key source: the proxies adapt KeySource.Version
// to it, e.g. func(id string, v int) ([]byte, error) { k, err :=
// flow.Keys.Version(id, v); return k.Key, err }.
func keysFor(id string, version int) ([]byte, error) {
	if id != "egress-dek" || version != 3 {
		return nil, errors.New("data key not held")
	}
	return dataKey, nil
}

// A secure HTTP proxy seals a request body of known length on its way out
// and opens it when it comes back.
func Example() {
	body := strings.Repeat("patient record\n", 10000)
	cfg := seal.SealConfig{Key: dataKey, KeyID: "egress-dek", KeyVersion: 3, Context: "rule=blob-store"}

	// Outbound: Content-Length first, then stream the body through a Sealer.
	layout, err := cfg.Layout()
	if err != nil {
		panic(err)
	}
	contentLength := layout.SealedSize(int64(len(body)))
	var upstream bytes.Buffer // the connection to the store
	s, err := seal.NewSealer(&upstream, cfg)
	if err != nil {
		panic(err)
	}
	if _, err := io.Copy(s, strings.NewReader(body)); err != nil {
		panic(err)
	}
	if err := s.Close(); err != nil { // the final segment
		panic(err)
	}
	fmt.Println("Content-Length matches:", int64(upstream.Len()) == contentLength)

	// Inbound: the header names the key; only verified bytes come out.
	o := seal.NewOpener(&upstream, keysFor, seal.WithContext("rule=blob-store"))
	var toSandbox bytes.Buffer
	if _, err := io.Copy(&toSandbox, o); err != nil {
		// A refusal after some bytes went out: reset the sandbox's
		// connection, never let a cut body pass for a whole one.
		panic(err)
	}
	fmt.Println("round trip:", toSandbox.String() == body)
	// Output:
	// Content-Length matches: true
	// round trip: true
}

// A secure TCP proxy seals each direction as its own interactive object
// and flushes after every read, so the peer gets each message at once.
func ExampleSealer_Flush() {
	var wire bytes.Buffer
	s, err := seal.NewSealer(&wire, seal.SealConfig{
		Key: dataKey, KeyID: "egress-dek", KeyVersion: 3, Context: "rule=db dir=out", Interactive: true,
	})
	if err != nil {
		panic(err)
	}
	s.Write([]byte("SELECT 1;"))
	s.Flush()
	o := seal.NewOpener(bytes.NewReader(wire.Bytes()), keysFor, seal.WithContext("rule=db dir=out"))
	msg := make([]byte, 9)
	io.ReadFull(o, msg)
	fmt.Printf("peer got %q before the stream ended\n", msg)

	// The reply direction is another object with its own context: a stream
	// reflected back does not open as a reply.
	reflected := seal.NewOpener(bytes.NewReader(wire.Bytes()), keysFor, seal.WithContext("rule=db dir=in"))
	_, err = reflected.Read(msg)
	fmt.Println(errors.Is(err, seal.ErrRefused))
	// Output:
	// peer got "SELECT 1;" before the stream ended
	// true
}

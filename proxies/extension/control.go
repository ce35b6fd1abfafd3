package extension

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/proxies"
)

// control is one control connection to an extension: the flows handed
// over on it, and the goroutine that reads the extension's messages.
type control struct {
	p          *Proxy
	uc         *net.UnixConn
	reportsEnd bool

	// wsem lets one writer at a time set the connection's write deadline.
	wsem chan struct{}

	mu    sync.Mutex
	flows map[uint64]*flowState // nil once dead

	once       sync.Once
	err        error         // why it died; set before dead is closed
	dead       chan struct{} // closed when the connection failed
	readerDone chan struct{} // closed when readLoop returned
}

// flowState is a flow handed over on a control connection.
type flowState struct {
	id       uint64
	report   proxies.Reporter
	accepted bool
	denials  int
	answer   chan answer         // one accept or refuse
	end      chan proxies.Result // one end
}

type answer struct {
	accepted bool
	reason   string
}

// dialControl connects to p's extension and exchanges hellos, by
// deadline.
func dialControl(p *Proxy, deadline time.Time) (*control, error) {
	d := net.Dialer{Deadline: deadline}
	nc, err := d.Dial("unixpacket", p.Path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotListening, err)
	}
	c := &control{
		p: p, uc: nc.(*net.UnixConn),
		wsem:       make(chan struct{}, 1),
		flows:      map[uint64]*flowState{},
		dead:       make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	if err := c.hello(deadline); err != nil {
		c.uc.Close()
		return nil, err
	}
	return c, nil
}

func (c *control) hello(deadline time.Time) error {
	b, _ := json.Marshal(helloOut{Type: typeHello, Version: Version, Extension: c.p.Name, MaxMessage: MaxMessage})
	c.uc.SetDeadline(deadline)
	if _, err := c.uc.Write(b); err != nil {
		return ioError("sending hello", err)
	}
	buf := make([]byte, MaxMessage)
	oob := make([]byte, oobSize)
	msg, err := c.read(buf, oob)
	if err != nil {
		return err
	}
	m, err := decode(msg)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	if m.Type != typeHello {
		return fmt.Errorf("%w: %s before hello", ErrProtocol, m.Type)
	}
	if *m.Version != Version {
		return fmt.Errorf("%w: extension speaks version %d, this firewall %d", ErrProtocol, *m.Version, Version)
	}
	c.reportsEnd = m.ReportsEnd
	c.uc.SetDeadline(time.Time{})
	return nil
}

// oobSize is room for a few descriptors, so that an extension sending
// some (which it must not) has them received and closed here, not left
// in flight.
var oobSize = unix.CmsgSpace(8 * 4)

// read reads one message. A message that does not fit, carries ancillary
// data, or is empty (which is how SOCK_SEQPACKET reports the peer's close)
// ends the conversation.
func (c *control) read(buf, oob []byte) ([]byte, error) {
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
	if oobn > 0 {
		closeRights(oob[:oobn])
		return nil, fmt.Errorf("%w: the extension sent ancillary data (descriptors)", ErrProtocol)
	}
	if err != nil {
		return nil, ioError("reading", err)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return nil, fmt.Errorf("%w: message over %d bytes", ErrProtocol, MaxMessage)
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: the extension closed the connection", ErrLost)
	}
	return buf[:n], nil
}

// closeRights closes the descriptors a control message brought in.
func closeRights(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}

// ioError classifies an I/O error on the control connection.
func ioError(what string, err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%s)", ErrTimeout, what)
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: the extension closed the connection", ErrLost)
	}
	return fmt.Errorf("%w: %s: %v", ErrLost, what, err)
}

// readLoop reads the extension's messages until the connection fails.
func (c *control) readLoop() {
	defer close(c.readerDone)
	buf := make([]byte, MaxMessage)
	oob := make([]byte, oobSize)
	for {
		msg, err := c.read(buf, oob)
		if err == nil {
			var m *inMsg
			if m, err = decode(msg); err != nil {
				err = fmt.Errorf("%w: %v", ErrProtocol, err)
			} else {
				err = c.handle(m)
			}
		}
		if err != nil {
			c.fail(err)
			return
		}
	}
}

// handle applies one message of the extension.
func (c *control) handle(m *inMsg) error {
	if m.Type == typeHello {
		return fmt.Errorf("%w: a second hello", ErrProtocol)
	}
	id := *m.ID
	if id > c.p.lastID.Load() {
		return fmt.Errorf("%w: %s for flow %d, which was never sent", ErrProtocol, m.Type, id)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	fs := c.flows[id]
	if fs == nil {
		// Forgotten: timed out, revoked, or on an earlier connection.
		// Messages racing with the close message are no violation.
		return nil
	}
	switch m.Type {
	case typeAccept, typeRefuse:
		if fs.accepted {
			return fmt.Errorf("%w: %s for flow %d, which was accepted already", ErrProtocol, m.Type, id)
		}
		if m.Type == typeRefuse {
			delete(c.flows, id)
			fs.answer <- answer{reason: *m.Reason}
			return nil
		}
		fs.accepted = true
		if !c.reportsEnd {
			delete(c.flows, id)
		}
		fs.answer <- answer{accepted: true}
		return nil
	}
	if !fs.accepted {
		return fmt.Errorf("%w: %s for flow %d before accept", ErrProtocol, m.Type, id)
	}
	// Reporter calls happen under c.mu: once ServeStream has abandoned a
	// flow (which takes c.mu), nothing more is reported for it.
	switch m.Type {
	case typeBytes:
		if *m.Out != 0 || *m.In != 0 {
			fs.report.Bytes(*m.Out, *m.In)
		}
	case typeDeny:
		fs.denials++
		if fs.denials > maxDenials {
			if fs.denials == maxDenials+1 {
				c.p.logger().Warn("extension reports too many denials; dropping the rest of this flow's", logExtension, c.p.Name, logID, id)
			}
			return nil
		}
		fs.report.Deny(proxies.Denial{
			Reason: *m.Reason,
			Status: m.Status,
			Method: truncate(m.Method, maxMethod),
			Path:   truncate(m.Path, maxPath),
			Detail: truncate(m.Detail, maxDetail),
		})
	case typeEnd:
		delete(c.flows, id)
		r := proxies.Result{End: endResults[*m.Result]}
		if r.End == proxies.EndError {
			r.Err = fmt.Errorf("extension %s: %s", c.p.Name, truncate(m.Error, maxDetail))
		}
		fs.end <- r
	}
	return nil
}

// register adds a flow about to be sent.
func (c *control) register(fs *flowState) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.flows == nil {
		return c.err
	}
	c.flows[fs.id] = fs
	return nil
}

// abandon forgets a flow whose ServeStream gives up on it (its answer
// timed out, or its context is done) and reports whether it did. False
// means the extension's answer or end arrived meanwhile and waits in the
// flow's channel: the caller takes it instead.
func (c *control) abandon(fs *flowState, afterAccept bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.flows == nil {
		return true // dead: nothing more will come
	}
	if c.flows[fs.id] != fs || fs.accepted && !afterAccept {
		return false
	}
	delete(c.flows, fs.id)
	return true
}

// lockWrite takes the right to write, by deadline.
func (c *control) lockWrite(deadline time.Time) error {
	select {
	case c.wsem <- struct{}{}:
		return nil
	default:
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case c.wsem <- struct{}{}:
		return nil
	case <-c.dead:
		return c.err
	case <-timer.C:
		return fmt.Errorf("%w (waiting to write)", ErrTimeout)
	}
}

func (c *control) unlockWrite() { <-c.wsem }

// sendFlow sends a flow message with conn's descriptor, by deadline. A
// write that times out sent nothing (a SOCK_SEQPACKET message goes whole
// or not at all); any other failure drops the connection.
func (c *control) sendFlow(msg []byte, conn net.Conn, deadline time.Time) error {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%w: a %T has no descriptor to pass", ErrUnavailable, conn)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if err := c.lockWrite(deadline); err != nil {
		return err
	}
	defer c.unlockWrite()
	var werr error
	cerr := rc.Control(func(fd uintptr) {
		c.uc.SetWriteDeadline(deadline)
		_, _, werr = c.uc.WriteMsgUnix(msg, unix.UnixRights(int(fd)), nil)
	})
	if cerr != nil {
		return fmt.Errorf("%w: the sandbox's connection is closed: %v", ErrUnavailable, cerr)
	}
	if werr != nil {
		err := ioError("sending flow", werr)
		if !errors.Is(err, ErrTimeout) {
			c.fail(err)
		}
		return err
	}
	return nil
}

// sendClose tells the extension to close a flow. An extension that cannot
// take it within CloseTimeout loses its control connection, which obliges
// it to close every flow it holds: a flow the firewall gives up on must
// not stay open.
func (c *control) sendClose(id uint64, reason string) {
	b, _ := json.Marshal(closeOut{Type: typeClose, ID: id, Reason: reason})
	deadline := time.Now().Add(c.p.closeTimeout())
	err := c.lockWrite(deadline)
	if err == nil {
		c.uc.SetWriteDeadline(deadline)
		_, err = c.uc.Write(b)
		c.unlockWrite()
	}
	select {
	case <-c.dead:
		return
	default:
	}
	if err != nil {
		c.fail(fmt.Errorf("%w: close of flow %d not delivered: %v", ErrLost, id, err))
	}
}

// fail ends the connection once: every flow waiting on it learns why
// (dead, err), and the proxy dials a new one for the next flow.
func (c *control) fail(err error) {
	c.once.Do(func() {
		c.mu.Lock()
		c.err = err
		c.flows = nil
		c.mu.Unlock()
		// Forget it before anyone learns it died, so that a flow started
		// after that dials anew instead of finding the dead one.
		c.p.lost(c, err)
		c.uc.Close()
		close(c.dead)
	})
}

package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// CounterKey identifies one datapath counter.
type CounterKey struct {
	SandboxID uint32
	RuleID    uint32
	Verdict   Verdict
	Reason    Reason
}

// CounterValue is a counter summed over CPUs.
type CounterValue struct {
	Packets, Bytes, Flows uint64
}

// Counters reads every counter, summing the per-CPU values.
func (d *Datapath) Counters() (map[CounterKey]CounterValue, error) {
	out := map[CounterKey]CounterValue{}
	var k datapathCounterKey
	var percpu []datapathCounter
	it := d.objs.CwCounters.Iterate()
	for it.Next(&k, &percpu) {
		var sum CounterValue
		for _, c := range percpu {
			sum.Packets += c.Packets
			sum.Bytes += c.Bytes
			sum.Flows += c.Flows
		}
		out[CounterKey{SandboxID: k.SandboxId, RuleID: k.RuleId, Verdict: Verdict(k.Verdict), Reason: Reason(k.Reason)}] = sum
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading counters: %w", err)
	}
	return out, nil
}

// DeleteCounters removes a sandbox's counters (after its DEL).
func (d *Datapath) DeleteCounters(sandboxID uint32) error {
	var keys []datapathCounterKey
	var k datapathCounterKey
	var percpu []datapathCounter
	it := d.objs.CwCounters.Iterate()
	for it.Next(&k, &percpu) {
		if k.SandboxId == sandboxID {
			keys = append(keys, k)
		}
	}
	for i := range keys {
		_ = d.objs.CwCounters.Delete(&keys[i])
	}
	return it.Err()
}

// DenyEvent is one dropped packet, as reported by the ring buffer.
type DenyEvent struct {
	Time      time.Duration // CLOCK_MONOTONIC
	SandboxID uint32
	Ifindex   uint32
	Reason    Reason
	Family    uint8
	Proto     uint8
	Src, Dst  netip.AddrPort
	SrcMAC    net.HardwareAddr
	Ethertype uint16
	// RuleID is the rule a dropped new flow matched (ReasonExpired,
	// ReasonFlowLimit); 0 for every other drop.
	RuleID uint32
	// Len is the packet's length from its Ethernet header.
	Len uint32
	// Sample is the packet's first bytes (at most DenySampleLen), from its
	// Ethernet header: the datapath runs at tc on Ethernet devices (veth,
	// bridge), so a sample always starts at L2.
	Sample []byte
}

// DenySampleLen is how many bytes of a dropped packet its deny event
// carries (DENY_SAMPLE_LEN in datapath.h).
const DenySampleLen = len(datapathDenyEvent{}.Sample)

// EventReader reads deny events. Close it to stop a blocked Read.
type EventReader struct{ rd *ringbuf.Reader }

// Events opens a reader on the deny-event ring buffer.
func (d *Datapath) Events() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.objs.CwEvents)
	if err != nil {
		return nil, fmt.Errorf("opening deny events: %w", err)
	}
	return &EventReader{rd: rd}, nil
}

// ErrClosed is returned by Read after Close.
var ErrClosed = ringbuf.ErrClosed

// Read blocks for the next event.
func (r *EventReader) Read() (DenyEvent, error) {
	rec, err := r.rd.Read()
	if err != nil {
		return DenyEvent{}, err
	}
	var raw datapathDenyEvent
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
		return DenyEvent{}, fmt.Errorf("decoding deny event: %w", err)
	}
	ev := DenyEvent{
		Time:      time.Duration(raw.TimestampNs),
		SandboxID: raw.SandboxId,
		Ifindex:   raw.Ifindex,
		Reason:    Reason(raw.Reason),
		Family:    raw.Family,
		Proto:     raw.Proto,
		SrcMAC:    net.HardwareAddr(append([]byte(nil), raw.SrcMac[:]...)),
		Ethertype: raw.Ethertype,
		RuleID:    raw.RuleId,
		Len:       raw.PktLen,
	}
	if n := int(raw.SampleLen); n > 0 && n <= len(raw.Sample) {
		ev.Sample = append([]byte(nil), raw.Sample[:n]...)
	}
	switch raw.Family {
	case 4:
		ev.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(raw.SrcAddr[:4])), raw.SrcPort)
		ev.Dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(raw.DstAddr[:4])), raw.DstPort)
	case 6:
		ev.Src = netip.AddrPortFrom(netip.AddrFrom16(raw.SrcAddr), raw.SrcPort)
		ev.Dst = netip.AddrPortFrom(netip.AddrFrom16(raw.DstAddr), raw.DstPort)
	}
	return ev, nil
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t.
func (r *EventReader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }

// Close stops the reader.
func (r *EventReader) Close() error {
	if r == nil {
		return errors.New("nil event reader")
	}
	return r.rd.Close()
}

package main

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/cleanwall/cleanwall/runtime/api"
)

func TestPcapWriter(t *testing.T) {
	var buf bytes.Buffer
	w := &pcapWriter{w: &buf}
	at := time.Date(2026, 12, 4, 12, 0, 0, 123456000, time.UTC)
	frame := bytes.Repeat([]byte{0xab}, 60)
	for _, ev := range []api.DenyEvent{
		{Source: "dns", Verdict: api.VerdictRefuse}, // no header: not a packet
		{Time: at, Verdict: api.VerdictDrop, Length: 600, Header: frame[:54], Link: api.LinkEthernet},
		{Time: at, Verdict: api.VerdictDrop, Length: 40, Header: frame[:40], Link: api.LinkRaw}, // another link type
		{Time: at.Add(time.Second), Verdict: api.VerdictDrop, Length: 20, Header: frame[:60], Link: api.LinkEthernet},
	} {
		if err := w.write(ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.finish(); err != nil {
		t.Fatal(err)
	}
	if w.packets != 2 || w.mismatch != 1 {
		t.Fatalf("%d packets, %d left out", w.packets, w.mismatch)
	}
	r, err := pcapgo.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != layers.LinkTypeEthernet || r.Snaplen() != api.DenyHeaderLen {
		t.Fatalf("link type %v, snapshot length %d", r.LinkType(), r.Snaplen())
	}
	data, ci, err := r.ReadPacketData()
	if err != nil || !bytes.Equal(data, frame[:54]) || ci.Length != 600 || ci.CaptureLength != 54 || !ci.Timestamp.Equal(at) {
		t.Fatalf("first packet: %v %+v %x", err, ci, data)
	}
	// An original length below what was captured is raised to it.
	if _, ci, err = r.ReadPacketData(); err != nil || ci.Length != 60 || ci.CaptureLength != 60 {
		t.Fatalf("second packet: %v %+v", err, ci)
	}
	if _, _, err := r.ReadPacketData(); err != io.EOF {
		t.Fatalf("a third packet: %v", err)
	}
}

// A capture that saw no dropped packet is still a valid, empty file.
func TestPcapWriterEmpty(t *testing.T) {
	var buf bytes.Buffer
	if err := (&pcapWriter{w: &buf}).finish(); err != nil {
		t.Fatal(err)
	}
	r, err := pcapgo.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.ReadPacketData(); err != io.EOF {
		t.Fatalf("read %v from an empty capture", err)
	}
}

func TestObserveFilterFlags(t *testing.T) {
	f, err := observeFilter("abc", "drop", "no-rule,spoofed-ip", "api", "tcp")
	if err != nil || f.Sandbox != "abc" || len(f.Reasons) != 2 || f.Protos[0] != "tcp" || f.Rules[0] != "api" {
		t.Fatalf("%+v %v", f, err)
	}
	for _, bad := range [][5]string{{"", "allow", "", "", ""}, {"", "", "a,,b", "", ""}, {"", "", "", "", ","}} {
		if _, err := observeFilter(bad[0], bad[1], bad[2], bad[3], bad[4]); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

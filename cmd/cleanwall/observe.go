package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/cleanwall/cleanwall/runtime/api"
)

const observeUsage = "usage: cleanwall observe [--sandbox ID] [--verdict drop,refuse] [--reason R,...] [--rule NAME,...] [--proto P,...] [--output table|json] [--pcap FILE] [--count N] [--socket PATH]"

// cmdObserve streams deny events until interrupted: what the datapath
// dropped and what the DNS and HTTP proxies refused. --pcap writes the
// sampled headers of dropped packets to a capture file (tcpdump -r,
// Wireshark).
func cmdObserve(args []string) error {
	fs := flag.NewFlagSet("cleanwall observe", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sandbox := fs.String("sandbox", "", "only this sandbox (its CNI container ID, or ID/ifName)")
	verdict := fs.String("verdict", "", "only these verdicts: drop (datapath), refuse (proxies); comma-separated")
	reason := fs.String("reason", "", "only these reasons (e.g. no-rule,spoofed-ip,not_allowed); comma-separated")
	rule := fs.String("rule", "", "only denials within these egress rules; comma-separated")
	proto := fs.String("proto", "", "only these protocols (tcp, udp, icmp, icmpv6, arp, ...); comma-separated")
	output := fs.String("output", "table", "table or json (one object per line)")
	asJSON := fs.Bool("json", false, "same as --output json")
	pcapFile := fs.String("pcap", "", "write the sampled headers of dropped packets to this pcap file (created or truncated)")
	count := fs.Int("count", 0, "exit after this many events (0: until interrupted)")
	socket := socketFlag(fs)
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		return fail("%s", observeUsage)
	}
	if *asJSON {
		*output = "json"
	}
	if *output != "table" && *output != "json" {
		return fail("--output %q: want table or json", *output)
	}
	if *count < 0 {
		return fail("--count %d: want 0 or more", *count)
	}
	filter, err := observeFilter(*sandbox, *verdict, *reason, *rule, *proto)
	if err != nil {
		return fail("%v", err)
	}
	var pw *pcapWriter
	if *pcapFile != "" {
		f, err := os.Create(*pcapFile)
		if err != nil {
			return fail("--pcap: %v", err)
		}
		defer f.Close()
		pw = &pcapWriter{w: f}
		filter.Headers = true
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	enc := json.NewEncoder(os.Stdout)
	if *output == "table" {
		fmt.Println(tableHeader)
	}
	seen := 0
	errDone := errors.New("done")
	err = api.NewClient(*socket).WatchEvents(ctx, filter, func(ev api.DenyEvent) error {
		if pw != nil {
			if err := pw.write(ev); err != nil {
				return err
			}
		}
		ev.Header, ev.Link = nil, "" // the capture has them; keep the lines short
		if *output == "json" {
			if err := enc.Encode(ev); err != nil {
				return err
			}
		} else if _, err := fmt.Println(formatEvent(ev)); err != nil {
			return err
		}
		seen++
		if *count > 0 && seen >= *count {
			return errDone
		}
		return nil
	})
	if ctx.Err() != nil || errors.Is(err, errDone) {
		if pw != nil {
			return pw.finish()
		}
		return nil
	}
	return fail("%v", err)
}

// observeFilter builds the daemon's event filter from the flags, checking
// each the way the daemon does.
func observeFilter(sandbox, verdict, reason, rule, proto string) (api.EventFilter, error) {
	q := map[string][]string{}
	for key, v := range map[string]string{"sandbox": sandbox, "verdict": verdict, "reason": reason, "rule": rule, "proto": proto} {
		if v != "" {
			q[key] = []string{v}
		}
	}
	f, err := api.ParseEventFilter(q)
	if err != nil {
		var ae *api.Error
		if errors.As(err, &ae) {
			return f, fmt.Errorf("--%s %s", ae.Field, ae.Message)
		}
		return f, err
	}
	return f, nil
}

// pcapWriter writes dropped packets' sampled headers as a pcap capture.
// The file header is written with the first packet's link type (every
// sample of the datapath starts at the Ethernet header); a packet of
// another link type cannot share the file and is left out, with a note.
// Each packet is written through to the file: what was observed is in the
// file even if the command is killed.
type pcapWriter struct {
	w        io.Writer
	pw       *pcapgo.Writer
	link     string
	packets  int
	mismatch int
}

func linkType(link string) (layers.LinkType, bool) {
	switch link {
	case api.LinkEthernet:
		return layers.LinkTypeEthernet, true
	case api.LinkRaw:
		return layers.LinkTypeRaw, true
	}
	return 0, false
}

func (p *pcapWriter) write(ev api.DenyEvent) error {
	if len(ev.Header) == 0 {
		return nil // a proxy's refusal, or a drop without a sample
	}
	lt, ok := linkType(ev.Link)
	if !ok {
		p.mismatch++
		return nil
	}
	if p.pw == nil {
		p.pw = pcapgo.NewWriter(p.w)
		if err := p.pw.WriteFileHeader(api.DenyHeaderLen, lt); err != nil {
			return fmt.Errorf("--pcap: %w", err)
		}
		p.link = ev.Link
	} else if ev.Link != p.link {
		p.mismatch++
		return nil
	}
	length := max(ev.Length, len(ev.Header))
	ci := gopacket.CaptureInfo{Timestamp: ev.Time, CaptureLength: len(ev.Header), Length: length}
	if err := p.pw.WritePacket(ci, ev.Header); err != nil {
		return fmt.Errorf("--pcap: %w", err)
	}
	p.packets++
	return nil
}

// finish gives a capture that saw no packet its file header (an empty but
// valid capture) and reports what was written.
func (p *pcapWriter) finish() error {
	if p.pw == nil {
		p.pw = pcapgo.NewWriter(p.w)
		if err := p.pw.WriteFileHeader(api.DenyHeaderLen, layers.LinkTypeEthernet); err != nil {
			return fmt.Errorf("--pcap: %w", err)
		}
	}
	fmt.Fprintf(os.Stderr, "cleanwall observe: %d dropped packets captured", p.packets)
	if p.mismatch > 0 {
		fmt.Fprintf(os.Stderr, " (%d left out: another link type)", p.mismatch)
	}
	fmt.Fprintln(os.Stderr)
	return nil
}

const tableHeader = "TIME          SANDBOX                        SOURCE   VERDICT PROTO  REASON                 RULE             DETAIL"

func formatEvent(ev api.DenyEvent) string {
	var what []string
	switch ev.Source {
	case "dns":
		what = append(what, "name="+ev.Name)
	case "http":
		what = append(what, fmt.Sprintf("%d %s %s", ev.Status, ev.Method, ev.Path))
	}
	if ev.Src != "" {
		what = append(what, ev.Src+" -> "+ev.Dst)
	} else if ev.Dst != "" {
		what = append(what, "-> "+ev.Dst)
	}
	if ev.Length > 0 {
		what = append(what, fmt.Sprintf("len=%d", ev.Length))
	}
	rule := ev.Rule
	if rule == "" {
		rule = "-"
	}
	return fmt.Sprintf("%s  %-30s %-8s %-7s %-6s %-22s %-16s %s", ev.Time.Local().Format("15:04:05.000"), ev.Sandbox, ev.Source,
		ev.Verdict, ev.Proto, ev.Reason, rule, strings.Join(what, " "))
}

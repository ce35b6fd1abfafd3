package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
)

func cmdSandboxes(args []string) error {
	fs := flag.NewFlagSet("cleanwall sandboxes", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := socketFlag(fs)
	if err := fs.Parse(args); err != nil {
		return fail("usage: cleanwall sandboxes [--socket PATH]")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, err := api.NewClient(*socket).List(ctx)
	if err != nil {
		return fail("%v", err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNETNS\tINTERFACE\tADDRESSES\tPOLICY\tGEN\tRULES\tREDIRECTED\tDROPPED")
	for _, s := range list {
		var addrs []string
		for _, ip := range s.IPs {
			addrs = append(addrs, ip.Address.Addr().String())
		}
		var redirected, dropped uint64
		for _, c := range s.Counters {
			switch c.Verdict {
			case "redirect":
				redirected += c.Flows
			case "drop":
				dropped += c.Packets
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d flows\t%d pkts\n", s.ID, s.Netns, s.HostInterface,
			strings.Join(addrs, ","), s.PolicyName, s.Generation, s.Rules, redirected, dropped)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return printVolumes(os.Stdout, list)
}

// printVolumes lists the sandboxes' volumes: where the node sees each one
// (the directory or loop device a container runtime binds) and where the
// sandbox sees it.
func printVolumes(w io.Writer, list []api.Sandbox) error {
	have := false
	for _, s := range list {
		have = have || len(s.Volumes) > 0
	}
	if !have {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SANDBOX\tVOLUME\tKIND\tHOST PATH\tDEVICE\tPATH")
	for _, s := range list {
		for _, v := range s.Volumes {
			host, dev := v.HostPath, "-"
			if host == "" {
				host = "(not mounted: " + v.Error + ")"
			}
			if v.Device != nil {
				dev = fmt.Sprintf("%d:%d", v.Device.Major, v.Device.Minor)
			}
			fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.IfName, v.Name, v.Kind, host, dev, v.Path)
		}
	}
	return tw.Flush()
}

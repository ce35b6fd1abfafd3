package httpproxy_test

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"regexp"

	"github.com/prometheus/client_golang/prometheus"

	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
)

// The daemon accepts redirected connections on its transparent listener
// (whose accepted sockets' local address is the original destination) and
// hands each to ServeConn with the flow's context and the egress rule's
// translated open.http block.
func ExampleProxy_ServeConn() {
	metrics, err := httpproxy.NewMetrics(prometheus.DefaultRegisterer)
	if err != nil {
		panic(err)
	}
	p := &httpproxy.Proxy{
		Logger:  slog.Default(),
		Metrics: metrics,
		OnDeny: func(f httpproxy.Flow, d httpproxy.Denial) {
			slog.Info("audit", "sandbox", f.Sandbox, "rule", f.Rule, "reason", d.Reason)
		},
		// Dial: a dialer whose sockets the datapath does not redirect again.
	}
	rules := &httpproxy.Rules{
		Rules: []httpproxy.RequestRule{{
			Methods:      []string{"GET", "POST"},
			Paths:        []string{"/v1/results", "/v1/results/*"},
			ContentTypes: []string{"application/json"},
		}},
		MaxBodyBytes:     1 << 20,
		DenyBodyPatterns: []*regexp.Regexp{regexp.MustCompile(`\b\d{3}-\d{2}-\d{4}\b`)},
	}
	if err := rules.Validate(); err != nil { // also checked by ServeConn
		panic(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0") // the transparent listener in the daemon
	if err != nil {
		panic(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			dst := netip.MustParseAddrPort(c.LocalAddr().String()) // the original destination
			flow := httpproxy.Flow{Sandbox: "sb-1", Rule: "results-api", Dst: dst, Hosts: []string{"api.example.test"}}
			go func() { _ = p.ServeConn(context.Background(), c, flow, rules) }()
		}
	}()
	_ = ln.Close()
}

package postgres_test

import (
	"fmt"
	"log/slog"
	"net"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cleanwall/cleanwall/proxies"
	pgproxy "github.com/cleanwall/cleanwall/proxies/postgres"
)

// How cleanwalld registers the proxy: its upstream dialer, its metrics
// registry and logger.
func ExampleNew() {
	var upstreamDialer net.Dialer
	m, err := pgproxy.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		panic(err)
	}
	g := proxies.NewRegistry()
	if err := g.AddStream(pgproxy.Key, pgproxy.New(upstreamDialer.DialContext, m, slog.Default().With("proxy", "postgres"))); err != nil {
		panic(err)
	}
	fmt.Println(g.Keys())
	// Output: [open/postgres (stream)]
}

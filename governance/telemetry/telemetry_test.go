package telemetry

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	colmetrics "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	"google.golang.org/protobuf/proto"

	"github.com/cleanwall/cleanwall/internal/testutil"
)

// collector is a local OTLP/HTTP receiver over TLS: it decodes every
// export request.
type collector struct {
	srv  *httptest.Server
	reqs chan *colmetrics.ExportMetricsServiceRequest
	ca   string // PEM file of its certificate
}

func newCollector(t *testing.T) *collector {
	t.Helper()
	c := &collector{reqs: make(chan *colmetrics.ExportMetricsServiceRequest, 64)}
	c.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || r.URL.Path != "/v1/metrics" || r.Header.Get("Content-Type") != "application/x-protobuf" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		var req colmetrics.ExportMetricsServiceRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.reqs <- &req
		out, _ := proto.Marshal(&colmetrics.ExportMetricsServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}))
	// Its own CA (httptest's built-in certificate is the same for every
	// server).
	dir := t.TempDir()
	testutil.TestCA(t, dir, "collector")
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "collector.pem"), filepath.Join(dir, "collector.key"))
	if err != nil {
		t.Fatal(err)
	}
	c.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	c.srv.StartTLS()
	t.Cleanup(c.srv.Close)
	c.ca = filepath.Join(dir, "ca.pem")
	return c
}

// The registry's families arrive at the collector over TLS, with their
// labels as attributes, every interval and once more at shutdown.
func TestExportsTheRegistry(t *testing.T) {
	col := newCollector(t)
	reg := prometheus.NewRegistry()
	flows := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cleanwall_test_flows_total", Help: "test"}, []string{"sandbox", "rule"})
	reg.MustRegister(flows)
	flows.WithLabelValues("sb-1", "results-api").Add(3)

	e, err := Start(context.Background(), Config{Endpoint: col.srv.URL, CAFile: col.ca, Interval: time.Second, Gatherer: reg, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	var got *colmetrics.ExportMetricsServiceRequest
	select {
	case got = <-col.reqs:
	case <-time.After(10 * time.Second):
		t.Fatal("no export within 10s")
	}
	v, attrs, ok := find(got, "cleanwall_test_flows_total")
	if !ok || v != 3 || attrs["sandbox"] != "sb-1" || attrs["rule"] != "results-api" {
		t.Fatalf("exported cleanwall_test_flows_total = %v %v (found %v)", v, attrs, ok)
	}
	if svc := resourceAttr(got, "service.name"); svc != "cleanwalld" {
		t.Errorf("service.name %q", svc)
	}
	flows.WithLabelValues("sb-1", "results-api").Add(2)
	if err := e.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case got = <-col.reqs:
			if v, _, ok := find(got, "cleanwall_test_flows_total"); ok && v == 5 {
				return
			}
		case <-deadline:
			t.Fatal("the last export did not carry the final value")
		}
	}
}

// A collector whose certificate does not chain to --otlp-ca gets nothing.
func TestRefusesAnUnverifiedCollector(t *testing.T) {
	col := newCollector(t)
	other := newCollector(t) // another self-signed certificate
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewCounter(prometheus.CounterOpts{Name: "x_total", Help: "x"}))
	e, err := Start(context.Background(), Config{Endpoint: col.srv.URL, CAFile: other.ca, Interval: time.Second, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Flush(ctx); err == nil {
		t.Error("an export to a collector with an unverified certificate succeeded")
	}
	_ = e.Shutdown(ctx)
	select {
	case <-col.reqs:
		t.Fatal("the collector received an export over an unverified connection")
	default:
	}
}

func TestConfigErrorsNameTheFlag(t *testing.T) {
	reg := prometheus.NewRegistry()
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	os.WriteFile(notPEM, []byte("not a certificate"), 0o600)
	for _, c := range []struct {
		cfg   Config
		field string
		words string
	}{
		{Config{Endpoint: "http://127.0.0.1:4318", Gatherer: reg}, FieldEndpoint, "https"},
		{Config{Endpoint: "https://127.0.0.1", Gatherer: reg}, FieldEndpoint, "HOST:PORT"},
		{Config{Endpoint: "https://:4318", Gatherer: reg}, FieldEndpoint, "HOST:PORT"},
		{Config{Endpoint: "https://u:p@collector:4318", Gatherer: reg}, FieldEndpoint, "no user"},
		{Config{Endpoint: "https://collector:4318", CAFile: filepath.Join(dir, "missing.pem"), Gatherer: reg}, FieldCA, "no such file"},
		{Config{Endpoint: "https://collector:4318", CAFile: notPEM, Gatherer: reg}, FieldCA, "no PEM"},
		{Config{Endpoint: "https://collector:4318", Interval: time.Millisecond, Gatherer: reg}, FieldInterval, "at least"},
	} {
		err := c.cfg.Check()
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != c.field || !strings.Contains(err.Error(), c.words) {
			t.Errorf("%+v: error %v, want one naming %s with %q", c.cfg, err, c.field, c.words)
		}
	}
	ok := Config{Endpoint: "https://collector.example:4318/otlp/v1/metrics", Gatherer: reg}
	if err := ok.Check(); err != nil {
		t.Errorf("a valid configuration refused: %v", err)
	}
	if u, _ := ok.endpoint(); u.Path != "/otlp/v1/metrics" {
		t.Errorf("path %q", u.Path)
	}
	if u, _ := (&Config{Endpoint: "https://collector:4318"}).endpoint(); u.Path != "/v1/metrics" {
		t.Errorf("default path %q", u.Path)
	}
}

// find returns the value and attributes of the first data point of the
// metric named name.
func find(req *colmetrics.ExportMetricsServiceRequest, name string) (float64, map[string]string, bool) {
	for _, rm := range req.GetResourceMetrics() {
		for _, sm := range rm.GetScopeMetrics() {
			for _, m := range sm.GetMetrics() {
				if m.GetName() != name {
					continue
				}
				var pts []*metricspb.NumberDataPoint
				switch d := m.GetData().(type) {
				case *metricspb.Metric_Sum:
					pts = d.Sum.GetDataPoints()
				case *metricspb.Metric_Gauge:
					pts = d.Gauge.GetDataPoints()
				}
				for _, p := range pts {
					attrs := map[string]string{}
					for _, kv := range p.GetAttributes() {
						attrs[kv.GetKey()] = kv.GetValue().GetStringValue()
					}
					v := p.GetAsDouble()
					if _, ok := p.GetValue().(*metricspb.NumberDataPoint_AsInt); ok {
						v = float64(p.GetAsInt())
					}
					return v, attrs, true
				}
			}
		}
	}
	return 0, nil, false
}

func resourceAttr(req *colmetrics.ExportMetricsServiceRequest, key string) string {
	for _, rm := range req.GetResourceMetrics() {
		for _, kv := range rm.GetResource().GetAttributes() {
			if kv.GetKey() == key {
				return kv.GetValue().GetStringValue()
			}
		}
	}
	return ""
}

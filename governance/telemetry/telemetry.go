// Package telemetry exports cleanwalld's metrics to a customer's
// OpenTelemetry collector: OTLP over HTTP (protobuf), over TLS only, every
// interval. What is exported is exactly what /metrics serves: the
// daemon's Prometheus registry is read through the OpenTelemetry
// Prometheus bridge at each export, so the two can never disagree and
// nothing new is labelled (docs/telemetry.md says what each family
// carries). Logs are not exported: they stay on stderr (OpenTelemetry's
// log SDK is not stable yet).
package telemetry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	promclient "github.com/prometheus/client_golang/prometheus"
	prombridge "go.opentelemetry.io/contrib/bridges/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
)

// DefaultInterval is how often metrics are exported when Config.Interval
// is zero.
const DefaultInterval = 30 * time.Second

// MinInterval is the shortest export interval accepted.
const MinInterval = time.Second

// Config is an OTLP export of a Prometheus registry.
type Config struct {
	// Endpoint is the collector's OTLP/HTTP URL: https://HOST:PORT, with
	// an optional path (default /v1/metrics). Plain http is refused.
	Endpoint string
	// CAFile is a PEM file of the CAs the collector's certificate chains
	// to; empty: the system roots.
	CAFile string
	// Interval between exports (0: DefaultInterval).
	Interval time.Duration
	// Timeout of one export (0: the interval, at most 30s).
	Timeout time.Duration
	// Gatherer is what is exported (the daemon's registry).
	Gatherer promclient.Gatherer
	// Service and Version name the exporter in the resource
	// (service.name, service.version).
	Service, Version string
	// Logger receives export failures (rate-limited to one a minute);
	// nil: slog.Default().
	Logger *slog.Logger
}

// FieldError names the setting (its command-line flag) that is wrong.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Flag names, as FieldError.Field.
const (
	FieldEndpoint = "--otlp-endpoint"
	FieldCA       = "--otlp-ca"
	FieldInterval = "--otlp-interval"
)

// endpoint checks the collector's URL: https, a host, a port.
func (c *Config) endpoint() (*url.URL, error) {
	u, err := url.Parse(c.Endpoint)
	switch {
	case err != nil:
		return nil, &FieldError{FieldEndpoint, err}
	case u.Scheme != "https":
		return nil, &FieldError{FieldEndpoint, fmt.Errorf("%q: want https://HOST:PORT (metrics go to the collector over TLS only)", c.Endpoint)}
	case u.Hostname() == "" || u.Port() == "":
		return nil, &FieldError{FieldEndpoint, fmt.Errorf("%q: want https://HOST:PORT", c.Endpoint)}
	case u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return nil, &FieldError{FieldEndpoint, fmt.Errorf("%q: no user, query or fragment", c.Endpoint)}
	}
	if _, err := net.LookupPort("tcp", u.Port()); err != nil {
		return nil, &FieldError{FieldEndpoint, fmt.Errorf("%q: port: %v", c.Endpoint, err)}
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/v1/metrics"
	}
	return u, nil
}

// tlsConfig is TLS 1.2 or later to the collector, verified against CAFile
// (or the system roots).
func (c *Config) tlsConfig() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile == "" {
		return cfg, nil
	}
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, &FieldError{FieldCA, err}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, &FieldError{FieldCA, fmt.Errorf("%s: no PEM certificate in it", c.CAFile)}
	}
	cfg.RootCAs = pool
	return cfg, nil
}

// Check validates the configuration without starting anything.
func (c *Config) Check() error {
	if _, err := c.endpoint(); err != nil {
		return err
	}
	if c.Interval != 0 && c.Interval < MinInterval {
		return &FieldError{FieldInterval, fmt.Errorf("%v: at least %v", c.Interval, MinInterval)}
	}
	if c.Gatherer == nil {
		return errors.New("telemetry: no registry to export")
	}
	_, err := c.tlsConfig()
	return err
}

// Exporter exports a registry until Shutdown.
type Exporter struct {
	mp *sdkmetric.MeterProvider
}

// Start checks cfg and starts exporting every interval. The first export
// happens one interval after Start; Shutdown makes a last one.
func Start(ctx context.Context, cfg Config) (*Exporter, error) {
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	u, _ := cfg.endpoint()
	tc, _ := cfg.tlsConfig()
	iv := cfg.Interval
	if iv == 0 {
		iv = DefaultInterval
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = min(iv, 30*time.Second)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	otel.SetErrorHandler(&errorLog{log: log})
	exp, err := otlpmetrichttp.New(ctx,
		otlpmetrichttp.WithEndpointURL(u.String()),
		otlpmetrichttp.WithTLSClientConfig(tc),
		otlpmetrichttp.WithTimeout(timeout),
	)
	if err != nil {
		return nil, &FieldError{FieldEndpoint, err}
	}
	service := cfg.Service
	if service == "" {
		service = "cleanwalld"
	}
	attrs := []attribute.KeyValue{attribute.String("service.name", service)}
	if cfg.Version != "" {
		attrs = append(attrs, attribute.String("service.version", cfg.Version))
	}
	reader := sdkmetric.NewPeriodicReader(exp,
		sdkmetric.WithInterval(iv),
		sdkmetric.WithTimeout(timeout),
		sdkmetric.WithProducer(prombridge.NewMetricProducer(prombridge.WithGatherer(cfg.Gatherer))),
	)
	mp := sdkmetric.NewMeterProvider(
		sdkmetric.WithReader(reader),
		sdkmetric.WithResource(resource.NewSchemaless(attrs...)),
	)
	return &Exporter{mp: mp}, nil
}

// Flush exports now.
func (e *Exporter) Flush(ctx context.Context) error { return e.mp.ForceFlush(ctx) }

// Shutdown makes a last export and stops.
func (e *Exporter) Shutdown(ctx context.Context) error { return e.mp.Shutdown(ctx) }

// errorLog logs OpenTelemetry's errors (failed exports), at most one a
// minute: a collector that is down must not flood the log.
type errorLog struct {
	log        *slog.Logger
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (h *errorLog) Handle(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if now := time.Now(); now.Sub(h.last) >= time.Minute {
		h.log.Warn("otlp export failed", "error", err, "suppressed", h.suppressed)
		h.last, h.suppressed = now, 0
		return
	}
	h.suppressed++
}

package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client talks to cleanwalld over its unix socket.
type Client struct {
	Socket string
	http   *http.Client
}

// ErrUnreachable wraps failures to reach the daemon at all.
var ErrUnreachable = errors.New("cleanwalld is not reachable")

// NewClient returns a client for the daemon at socket ("" = DefaultSocket).
func NewClient(socket string) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 10 * time.Second,
	}
	return &Client{Socket: socket, http: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encoding request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://cleanwalld"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %w", ErrUnreachable, c.Socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(data, &e) == nil && e.Message != "" {
			return &e
		}
		return fmt.Errorf("cleanwalld: %s: %s", resp.Status, strings.TrimSpace(string(data)))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decoding response: %w", err)
		}
	}
	return nil
}

func sandboxPath(tmpl, id, ifName string) string {
	p := strings.Replace(tmpl, "{id}", url.PathEscape(id), 1)
	if ifName != "" {
		p += "?ifName=" + url.QueryEscape(ifName)
	}
	return p
}

// Status asks whether the daemon is ready.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, PathStatus, nil, &s)
	return s, err
}

// Add attaches and programs a sandbox.
func (c *Client) Add(ctx context.Context, req AddRequest) (Sandbox, error) {
	var s Sandbox
	err := c.do(ctx, http.MethodPost, PathSandboxes, req, &s)
	return s, err
}

// Delete detaches a sandbox; deleting an unknown sandbox succeeds.
func (c *Client) Delete(ctx context.Context, id, ifName string) error {
	return c.do(ctx, http.MethodDelete, sandboxPath(PathSandbox, id, ifName), nil, nil)
}

// Check verifies a sandbox's attachment and map entries.
func (c *Client) Check(ctx context.Context, id, ifName string) error {
	return c.do(ctx, http.MethodGet, sandboxPath(PathCheck, id, ifName), nil, nil)
}

// Get returns one sandbox with its counters.
func (c *Client) Get(ctx context.Context, id, ifName string) (Sandbox, error) {
	var s Sandbox
	err := c.do(ctx, http.MethodGet, sandboxPath(PathSandbox, id, ifName), nil, &s)
	return s, err
}

// List returns every sandbox with its counters.
func (c *Client) List(ctx context.Context) ([]Sandbox, error) {
	var s []Sandbox
	err := c.do(ctx, http.MethodGet, PathSandboxes, nil, &s)
	return s, err
}

// ApplyPolicy replaces a sandbox's policy atomically.
func (c *Client) ApplyPolicy(ctx context.Context, id, ifName string, req ApplyRequest) (ApplyResult, error) {
	var r ApplyResult
	err := c.do(ctx, http.MethodPut, sandboxPath(PathPolicy, id, ifName), req, &r)
	return r, err
}

// Policy reads a sandbox's rules back from the kernel.
func (c *Client) Policy(ctx context.Context, id, ifName string) (PolicyView, error) {
	var v PolicyView
	err := c.do(ctx, http.MethodGet, sandboxPath(PathPolicy, id, ifName), nil, &v)
	return v, err
}

// GC removes every attachment not listed as valid.
func (c *Client) GC(ctx context.Context, req GCRequest) (GCResult, error) {
	var r GCResult
	err := c.do(ctx, http.MethodPost, PathGC, req, &r)
	return r, err
}

// Attest reports the node's attestation and held keys.
func (c *Client) Attest(ctx context.Context) (AttestStatus, error) {
	var s AttestStatus
	err := c.do(ctx, http.MethodGet, PathAttest, nil, &s)
	return s, err
}

// Events streams deny events (of one sandbox when sandbox is set) to fn
// until ctx ends or fn returns an error.
func (c *Client) Events(ctx context.Context, sandbox string, fn func(DenyEvent) error) error {
	return c.WatchEvents(ctx, EventFilter{Sandbox: sandbox}, fn)
}

// WatchEvents streams the deny events that pass f to fn until ctx ends or
// fn returns an error. The daemon filters; events are checked here again.
func (c *Client) WatchEvents(ctx context.Context, f EventFilter, fn func(DenyEvent) error) error {
	path := PathEvents
	if q := f.Query(); len(q) > 0 {
		path += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://cleanwalld"+path, nil)
	if err != nil {
		return err
	}
	// A stream has no overall timeout: use a client without one.
	hc := &http.Client{Transport: c.http.Transport}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %w", ErrUnreachable, c.Socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e Error
		if data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10)); json.Unmarshal(data, &e) == nil && e.Message != "" {
			return fmt.Errorf("cleanwalld: %s: %w", resp.Status, &e)
		}
		return fmt.Errorf("cleanwalld: %s", resp.Status)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev DenyEvent
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		if !f.Match(ev) {
			continue
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
}

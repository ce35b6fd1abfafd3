package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// maxRequestBytes bounds API request bodies (a 100k-rule policy is a few MB).
const maxRequestBytes = 64 << 20

// serveAPI listens on the unix socket (0600: root's API). A stale socket
// file from a dead daemon is replaced; a live daemon's is not.
func (d *Daemon) serveAPI() error {
	if err := os.MkdirAll(filepath.Dir(d.cfg.Socket), 0o755); err != nil {
		return fmt.Errorf("creating socket dir: %w", err)
	}
	if _, err := os.Stat(d.cfg.Socket); err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, serr := api.NewClient(d.cfg.Socket).Status(ctx)
		cancel()
		if serr == nil {
			return fmt.Errorf("another cleanwalld is serving %s", d.cfg.Socket)
		}
		_ = os.Remove(d.cfg.Socket)
	}
	l, err := net.Listen("unix", d.cfg.Socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", d.cfg.Socket, err)
	}
	if err := os.Chmod(d.cfg.Socket, 0o600); err != nil {
		l.Close()
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathStatus, d.handleStatus)
	mux.HandleFunc("GET "+api.PathSandboxes, d.handleList)
	mux.HandleFunc("POST "+api.PathSandboxes, d.handleAdd)
	mux.HandleFunc("GET "+api.PathSandbox, d.handleGet)
	mux.HandleFunc("DELETE "+api.PathSandbox, d.handleDelete)
	mux.HandleFunc("GET "+api.PathCheck, d.handleCheck)
	mux.HandleFunc("GET "+api.PathPolicy, d.handlePolicyShow)
	mux.HandleFunc("PUT "+api.PathPolicy, d.handleApply)
	mux.HandleFunc("POST "+api.PathGC, d.handleGC)
	mux.HandleFunc("GET "+api.PathAttest, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, d.keys.Status()) })
	mux.HandleFunc("GET "+api.PathEvents, d.handleEvents)
	mux.HandleFunc("POST "+api.PathConsentRefresh, d.handleConsentRefresh)
	d.server = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	d.goBackground(func() {
		if err := d.server.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("api server", "error", err)
		}
	})
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var ae *api.Error
	var nf *notFound
	switch {
	case errors.As(err, &ae):
		writeJSON(w, http.StatusBadRequest, ae)
	case errors.As(err, &nf):
		writeJSON(w, http.StatusNotFound, &api.Error{Message: nf.msg})
	case errors.Is(err, bpf.ErrMapFull):
		writeJSON(w, http.StatusInsufficientStorage, &api.Error{Message: err.Error()})
	default:
		writeJSON(w, http.StatusInternalServerError, &api.Error{Message: err.Error()})
	}
}

// decode reads a JSON body strictly: unknown fields and trailing data are
// errors naming the problem.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &api.Error{Message: "malformed request: " + err.Error()}
	}
	if dec.More() {
		return &api.Error{Message: "malformed request: trailing data after the JSON object"}
	}
	return nil
}

func (d *Daemon) handleStatus(w http.ResponseWriter, _ *http.Request) {
	d.sandboxes.RLock()
	st := api.Status{Ready: d.ready.Load(), Version: d.cfg.Version, PinRoot: d.cfg.PinRoot,
		Sandboxes: d.sandboxes.Len(), Started: d.started, Ports: d.ports()}
	d.sandboxes.RUnlock()
	if !st.Ready {
		st.Reason = "starting"
		writeJSON(w, http.StatusServiceUnavailable, st)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (d *Daemon) handleAdd(w http.ResponseWriter, r *http.Request) {
	var req api.AddRequest
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	sb, err := d.Add(r.Context(), req)
	if err != nil {
		d.log.Warn("sandbox add refused", "sandbox", sandbox.AttachmentKey(req.ContainerID, req.IfName), "error", err)
		d.audit.record(auditSandboxRefuse, map[string]any{"sandbox": sandbox.AttachmentKey(req.ContainerID, req.IfName), "error": err.Error()})
		writeError(w, err)
		return
	}
	if err := d.audit.recordErr(auditSandboxAdd, map[string]any{"sandbox": sandbox.AttachmentKey(sb.ID, sb.IfName), "policy": sb.PolicyName,
		"policyHash": sb.PolicyHash, "rules": sb.Rules, "netns": sb.Netns, "interface": sb.HostInterface}); err != nil {
		// Nothing runs unaudited: an admission that cannot be recorded is
		// taken back before anything is acknowledged.
		if derr := d.Delete(sb.ID, sb.IfName); derr != nil {
			d.log.Error("taking back an unaudited admission", "sandbox", sandbox.AttachmentKey(sb.ID, sb.IfName), "error", derr)
		}
		writeError(w, fmt.Errorf("sandbox not admitted: %w", err))
		return
	}
	writeJSON(w, http.StatusCreated, sb)
}

func (d *Daemon) handleDelete(w http.ResponseWriter, r *http.Request) {
	if err := d.Delete(r.PathValue("id"), r.URL.Query().Get("ifName")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) handleCheck(w http.ResponseWriter, r *http.Request) {
	if err := d.Check(r.PathValue("id"), r.URL.Query().Get("ifName")); err != nil {
		var ae *api.Error
		if errors.As(err, &ae) {
			writeJSON(w, http.StatusNotFound, ae)
			return
		}
		writeJSON(w, http.StatusConflict, &api.Error{Message: err.Error()})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) handleList(w http.ResponseWriter, _ *http.Request) {
	list := d.sandboxes.Snapshot()
	out := make([]api.Sandbox, 0, len(list))
	for _, s := range list {
		out = append(out, d.view(s, true))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID+out[i].IfName < out[j].ID+out[j].IfName })
	writeJSON(w, http.StatusOK, out)
}

// one returns the (first) attachment a request names, or answers 404.
func (d *Daemon) one(w http.ResponseWriter, r *http.Request) *sandbox.Sandbox {
	d.sandboxes.RLock()
	list := d.sandboxes.Find(r.PathValue("id"), r.URL.Query().Get("ifName"))
	d.sandboxes.RUnlock()
	if len(list) == 0 {
		writeJSON(w, http.StatusNotFound, &api.Error{Message: "no sandbox " + r.PathValue("id")})
		return nil
	}
	return list[0]
}

func (d *Daemon) handleGet(w http.ResponseWriter, r *http.Request) {
	if s := d.one(w, r); s != nil {
		writeJSON(w, http.StatusOK, d.view(s, true))
	}
}

func (d *Daemon) handleApply(w http.ResponseWriter, r *http.Request) {
	var req api.ApplyRequest
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	if len(req.Policy) == 0 {
		writeError(w, &api.Error{Field: "policy", Message: "required"})
		return
	}
	id, ifName := r.PathValue("id"), r.URL.Query().Get("ifName")
	closed, compiled, err := d.Apply(id, ifName, req.Policy, req.PolicySource)
	if err != nil {
		d.audit.record(auditPolicyRefuse, map[string]any{"sandbox": sandbox.AttachmentKey(id, ifName), "source": req.PolicySource, "error": err.Error()})
		writeError(w, err)
		return
	}
	d.audit.record(auditPolicyApply, map[string]any{"sandbox": sandbox.AttachmentKey(id, ifName), "policy": compiled.Name,
		"policyHash": compiled.Hash, "source": req.PolicySource, "closedFlows": closed})
	d.sandboxes.RLock()
	list := d.sandboxes.Find(id, ifName)
	d.sandboxes.RUnlock()
	res := api.ApplyResult{ClosedFlows: closed}
	if len(list) > 0 {
		res.Sandbox = d.view(list[0], false)
	}
	for _, w := range compiled.Warnings {
		res.Warnings = append(res.Warnings, w.String())
	}
	writeJSON(w, http.StatusOK, res)
}

// handlePolicyShow reads the sandbox's active generation back from the
// kernel's maps, not from the daemon's memory.
func (d *Daemon) handlePolicyShow(w http.ResponseWriter, r *http.Request) {
	s := d.one(w, r)
	if s == nil {
		return
	}
	s.Lock()
	rec, compiled := s.Rec, s.Compiled
	s.Unlock()
	entry, err := d.kernel.Sandbox(rec.HostIfindex)
	if err != nil {
		writeError(w, err)
		return
	}
	if entry.ID != rec.DatapathID {
		writeError(w, fmt.Errorf("the kernel's entry of ifindex %d belongs to datapath id %d, not %d", rec.HostIfindex, entry.ID, rec.DatapathID))
		return
	}
	slot := uint8(entry.Generation)
	kernel, err := d.kernel.SandboxRules(rec.DatapathID, slot)
	if err != nil {
		writeError(w, err)
		return
	}
	view := api.PolicyView{Sandbox: s.Name, PolicyName: rec.PolicyName, Generation: rec.Generation, Slot: slot}
	now := sandbox.MonotonicNow()
	for _, e := range kernel {
		kr := api.KernelRule{Prefix: e.Prefix, Protocol: protoName(e.Proto), Port: e.Port, RuleID: e.RuleID, Mode: modeName(e.Mode)}
		if rule := compiled.Rule(e.RuleID); rule != nil {
			kr.Rule = rule.Name
		}
		if e.Expires != 0 {
			t := time.Now().Add(time.Duration(int64(e.Expires) - int64(now)))
			kr.Expires = &t
		}
		view.Rules = append(view.Rules, kr)
	}
	sort.Slice(view.Rules, func(i, j int) bool {
		a, b := view.Rules[i], view.Rules[j]
		if a.RuleID != b.RuleID {
			return a.RuleID < b.RuleID
		}
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c < 0
		}
		if a.Prefix.Bits() != b.Prefix.Bits() {
			return a.Prefix.Bits() < b.Prefix.Bits()
		}
		if a.Protocol != b.Protocol {
			return a.Protocol < b.Protocol
		}
		return a.Port < b.Port
	})
	writeJSON(w, http.StatusOK, view)
}

func (d *Daemon) handleGC(w http.ResponseWriter, r *http.Request) {
	var req api.GCRequest
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, api.GCResult{Removed: d.GC(req.Valid)})
}

func protoName(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	}
	return fmt.Sprint(p)
}

func modeName(m uint8) string {
	switch m {
	case 1:
		return "open"
	case 2:
		return "trusted"
	case 3:
		return "secure"
	}
	return fmt.Sprint(m)
}

func sortCounters(c []api.Counter) {
	sort.Slice(c, func(i, j int) bool {
		if c[i].Verdict != c[j].Verdict {
			return c[i].Verdict > c[j].Verdict
		}
		if c[i].RuleID != c[j].RuleID {
			return c[i].RuleID < c[j].RuleID
		}
		return c[i].Reason < c[j].Reason
	})
}

// view renders a sandbox for the API.
func (d *Daemon) view(s *sandbox.Sandbox, counters bool) api.Sandbox {
	s.Lock()
	rec := s.Rec
	compiled := s.Compiled
	rules := len(s.Entries)
	s.Unlock()
	v := api.Sandbox{
		ID: rec.ContainerID, IfName: rec.IfName, Netns: rec.Netns,
		HostInterface: rec.HostInterface, HostIfindex: rec.HostIfindex, Bridge: rec.Bridge,
		DatapathID: rec.DatapathID, MAC: rec.MAC, IPs: rec.IPs,
		PolicyName: rec.PolicyName, PolicyHash: compiled.Hash, Generation: rec.Generation,
		AttachMode: string(rec.Attachment.Mode), Created: rec.Created, Rules: rules,
	}
	if counters {
		v.Counters = d.countersOf(rec.DatapathID, compiled)
	}
	v.Volumes = d.volumeViews(s.Name)
	return v
}

func (d *Daemon) countersOf(id uint32, compiled *policy.Compiled) []api.Counter {
	all, err := d.kernel.Counters()
	if err != nil {
		return nil
	}
	var out []api.Counter
	for k, v := range all {
		if k.SandboxID != id {
			continue
		}
		c := api.Counter{RuleID: k.RuleID, Verdict: k.Verdict.String(), Reason: k.Reason.String(), Packets: v.Packets, Bytes: v.Bytes, Flows: v.Flows}
		if r := compiled.Rule(k.RuleID); r != nil {
			c.Rule = r.Name
		}
		out = append(out, c)
	}
	sortCounters(out)
	return out
}

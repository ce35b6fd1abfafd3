// Package kubernetes holds cleanwall's Kubernetes manifests; its test
// parses every one into the k8s.io/api types (strictly: an unknown field
// fails) and checks what the deployment relies on.
package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// ServiceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor the
// manifests use (the CRD is not in k8s.io/api); strict decoding refuses
// anything else, so a field added here must be one the CRD has.
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		JobLabel          string               `json:"jobLabel,omitempty"`
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path,omitempty"`
			Scheme        string `json:"scheme,omitempty"`
			Interval      string `json:"interval,omitempty"`
			ScrapeTimeout string `json:"scrapeTimeout,omitempty"`
			Relabelings   []struct {
				SourceLabels []string `json:"sourceLabels,omitempty"`
				TargetLabel  string   `json:"targetLabel,omitempty"`
				Action       string   `json:"action,omitempty"`
				Regex        string   `json:"regex,omitempty"`
				Replacement  string   `json:"replacement,omitempty"`
			} `json:"relabelings,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// Kustomization is the part of kustomize's file the manifests use.
type Kustomization struct {
	metav1.TypeMeta `json:",inline"`
	Resources       []string `json:"resources"`
	Patches         []struct {
		Path string `json:"path"`
	} `json:"patches,omitempty"`
}

// manifest is one decoded document.
type manifest struct {
	file string // relative to deploy/kubernetes
	kind string
	name string
	obj  any
}

// decodeStrict turns one YAML document into v: duplicate keys and unknown
// fields are errors.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data")
	}
	return nil
}

var docSeparator = regexp.MustCompile(`(?m)^---\s*$`)

func load(t *testing.T) []manifest {
	t.Helper()
	var files []string
	for _, pattern := range []string{"*.yaml", "snp/*.yaml"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	if len(files) == 0 {
		t.Fatal("no manifests")
	}
	var out []manifest
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSeparator.Split(string(data), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			var obj any
			switch tm.Kind {
			case "Namespace":
				obj = &corev1.Namespace{}
			case "ConfigMap":
				obj = &corev1.ConfigMap{}
			case "Service":
				obj = &corev1.Service{}
			case "PersistentVolumeClaim":
				obj = &corev1.PersistentVolumeClaim{}
			case "DaemonSet":
				obj = &appsv1.DaemonSet{}
			case "Deployment":
				obj = &appsv1.Deployment{}
			case "ServiceMonitor":
				obj = &ServiceMonitor{}
			case "Kustomization":
				obj = &Kustomization{}
			default:
				t.Fatalf("%s document %d: kind %q: add it to the test", f, i, tm.Kind)
			}
			if err := decodeStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s document %d (%s): %v", f, i, tm.Kind, err)
			}
			name := ""
			if o, ok := obj.(interface{ GetName() string }); ok {
				name = o.GetName()
			}
			out = append(out, manifest{file: f, kind: tm.Kind, name: name, obj: obj})
		}
	}
	return out
}

func stripComments(doc string) string {
	var b strings.Builder
	for l := range strings.SplitSeq(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func find[T any](t *testing.T, all []manifest, file, kind, name string) T {
	t.Helper()
	for _, m := range all {
		if m.file == file && m.kind == kind && m.name == name {
			return m.obj.(T)
		}
	}
	t.Fatalf("%s has no %s %q", file, kind, name)
	var zero T
	return zero
}

// The kustomizations list every manifest, and nothing that is not there.
func TestKustomizationsListEveryManifest(t *testing.T) {
	all := load(t)
	for _, dir := range []string{".", "snp"} {
		k := find[*Kustomization](t, all, filepath.Join(dir, "kustomization.yaml"), "Kustomization", "")
		if k.APIVersion != "kustomize.config.k8s.io/v1beta1" {
			t.Errorf("%s: apiVersion %q", dir, k.APIVersion)
		}
		var want []string
		for _, m := range all {
			if filepath.Dir(m.file) == dir && m.kind != "Kustomization" && !slices.Contains(want, filepath.Base(m.file)) {
				want = append(want, filepath.Base(m.file))
			}
		}
		got := slices.Clone(k.Resources)
		for _, p := range k.Patches {
			got = append(got, p.Path)
		}
		if dir == "snp" {
			if !slices.Equal(k.Resources, []string{"../"}) {
				t.Errorf("snp: resources %v, want the base", k.Resources)
			}
			got = got[1:]
		}
		sort.Strings(got)
		sort.Strings(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s/kustomization.yaml lists %v; the manifests there are %v", dir, got, want)
		}
	}
}

// flagsOf returns the flags a command accepts and whether each is a bool
// flag, from its -h output (Go's flag.PrintDefaults) of the binaries built
// from this tree.
func flagsOf(t *testing.T, argv ...string) map[string]bool {
	t.Helper()
	bin := binaries(t)
	cmd := exec.Command(filepath.Join(bin, argv[0]), append(argv[1:], "-h")...)
	out, _ := cmd.CombinedOutput()
	flags := map[string]bool{}
	for l := range strings.SplitSeq(string(out), "\n") {
		if !strings.HasPrefix(l, "  -") {
			continue
		}
		f := strings.Fields(l)
		flags[strings.TrimPrefix(f[0], "-")] = len(f) == 1
	}
	if len(flags) == 0 {
		t.Fatalf("%v -h printed no flags:\n%s", argv, out)
	}
	return flags
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// binaries builds cleanwall's commands from this tree once.
func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "cleanwall-k8s-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", buildDir+"/", "./cmd/cleanwalld", "./cmd/cleanwall", "./cmd/cleanwall-keybroker")
		cmd.Dir = "../.."
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// subcommands of our binaries that take flags after them.
var subcommands = map[string][][]string{
	"cleanwall": {{"cni", "install"}, {"cni", "uninstall"}, {"status"}},
}

// checkCommand checks that argv (a container's command and args, or a
// probe's) runs one of our binaries with flags it has, in --name=value
// form (bool flags bare), and returns the flags' values.
func checkCommand(t *testing.T, where string, argv []string) map[string]string {
	t.Helper()
	if len(argv) == 0 {
		t.Fatalf("%s: no command", where)
	}
	bin := argv[0]
	if !slices.Contains([]string{"cleanwalld", "cleanwall", "cleanwall-keybroker"}, bin) {
		t.Fatalf("%s: %q is not one of cleanwall's binaries", where, bin)
	}
	cmd := []string{bin}
	rest := argv[1:]
	for _, sub := range subcommands[bin] {
		if len(rest) >= len(sub) && slices.Equal(rest[:len(sub)], sub) {
			cmd = append(cmd, sub...)
			rest = rest[len(sub):]
			break
		}
	}
	if bin == "cleanwall" && len(cmd) == 1 {
		t.Fatalf("%s: cleanwall %v: not a subcommand the test knows", where, rest)
	}
	flags := flagsOf(t, cmd...)
	values := map[string]string{}
	for _, a := range rest {
		if !strings.HasPrefix(a, "--") {
			t.Errorf("%s: %q: want --flag=value", where, a)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		isBool, ok := flags[name]
		switch {
		case !ok:
			t.Errorf("%s: %v has no flag --%s", where, cmd, name)
		case isBool && hasValue:
			t.Errorf("%s: --%s is a bool flag: give it bare", where, name)
		case !isBool && !hasValue:
			t.Errorf("%s: --%s needs =value", where, name)
		}
		if _, dup := values[name]; dup {
			t.Errorf("%s: --%s given twice", where, name)
		}
		values[name] = value
	}
	return values
}

func argv(c corev1.Container) []string { return append(slices.Clone(c.Command), c.Args...) }

// mountAt returns the container's mount at path and its pod volume.
func mountAt(t *testing.T, spec corev1.PodSpec, c corev1.Container, path string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.MountPath == path {
			for _, v := range spec.Volumes {
				if v.Name == m.Name {
					return m, v
				}
			}
			t.Fatalf("%s: mount %s names volume %q, which the pod does not have", c.Name, path, m.Name)
		}
	}
	t.Fatalf("%s: nothing mounted at %s", c.Name, path)
	return corev1.VolumeMount{}, corev1.Volume{}
}

// hostMount checks that path in the container is the host's own path.
func hostMount(t *testing.T, spec corev1.PodSpec, c corev1.Container, path string, prop corev1.MountPropagationMode) {
	t.Helper()
	m, v := mountAt(t, spec, c, path)
	if v.HostPath == nil || v.HostPath.Path != path {
		t.Errorf("%s: %s is not the host's %s: %+v", c.Name, path, path, v.VolumeSource)
	}
	got := corev1.MountPropagationNone
	if m.MountPropagation != nil {
		got = *m.MountPropagation
	}
	if got != prop {
		t.Errorf("%s: %s propagation %s, want %s", c.Name, path, got, prop)
	}
}

func containers(spec corev1.PodSpec) []corev1.Container {
	return append(slices.Clone(spec.InitContainers), spec.Containers...)
}

func container(t *testing.T, list []corev1.Container, name string) corev1.Container {
	t.Helper()
	for _, c := range list {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

// Every container of every workload: one image with a pinned tag, requests
// and a memory limit, a read-only root, never privileged, no Bidirectional
// propagation (which needs a privileged container), all capabilities
// dropped and every added one justified in a comment of its manifest.
func TestEveryContainer(t *testing.T) {
	all := load(t)
	images := map[string]bool{}
	for _, m := range all {
		var spec corev1.PodSpec
		switch o := m.obj.(type) {
		case *appsv1.DaemonSet:
			spec = o.Spec.Template.Spec
		case *appsv1.Deployment:
			spec = o.Spec.Template.Spec
		default:
			continue
		}
		raw, err := os.ReadFile(m.file)
		if err != nil {
			t.Fatal(err)
		}
		if spec.HostPID || spec.HostIPC {
			t.Errorf("%s: hostPID or hostIPC", m.file)
		}
		if m.file == "snp/cleanwalld-snp.yaml" {
			continue // a patch: checked against the base in TestDaemonSet
		}
		if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
			t.Errorf("%s: the pod gets a service account token it has no use for", m.file)
		}
		for _, c := range containers(spec) {
			where := m.file + " " + c.Name
			if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":") {
				t.Errorf("%s: image %q: want a pinned tag", where, c.Image)
			}
			images[c.Image] = true
			if c.ImagePullPolicy != corev1.PullIfNotPresent {
				t.Errorf("%s: imagePullPolicy %q", where, c.ImagePullPolicy)
			}
			r := c.Resources
			if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
				t.Errorf("%s: resources %+v: want cpu and memory requests and a memory limit", where, r)
			}
			if r.Limits.Memory().Cmp(*r.Requests.Memory()) < 0 {
				t.Errorf("%s: memory limit below its request", where)
			}
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("%s: no securityContext", where)
				continue
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Errorf("%s: privileged", where)
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("%s: root filesystem not read-only", where)
			}
			if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("%s: capabilities not dropped (drop: [ALL])", where)
			} else {
				for _, cap := range sc.Capabilities.Add {
					if !strings.Contains(string(raw), "# "+string(cap)+": ") {
						t.Errorf("%s: capability %s added without a comment saying why (# %s: ...)", where, cap, cap)
					}
				}
			}
			for _, vm := range c.VolumeMounts {
				if vm.MountPropagation != nil && *vm.MountPropagation == corev1.MountPropagationBidirectional {
					t.Errorf("%s: %s: Bidirectional propagation needs a privileged container", where, vm.MountPath)
				}
			}
		}
	}
	if len(images) != 1 {
		t.Errorf("images %v: want one image for every container", images)
	}
}

// cleanwalldCapabilities is what the DaemonSet must add, exactly; each is
// justified in cleanwalld.yaml and TestCapabilitiesSuffice loads the
// datapath with them.
var cleanwalldCapabilities = []corev1.Capability{"NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"}

func TestDaemonSet(t *testing.T) {
	all := load(t)
	ds := find[*appsv1.DaemonSet](t, all, "cleanwalld.yaml", "DaemonSet", "cleanwalld")
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, dnsPolicy %s: the datapath and its proxy sockets live in the host's namespace", spec.HostNetwork, spec.DNSPolicy)
	}
	if ds.Spec.Selector == nil || ds.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != ds.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Errorf("selector %v does not select the template's labels %v", ds.Spec.Selector, ds.Spec.Template.Labels)
	}
	d := container(t, spec.Containers, "cleanwalld")
	if len(spec.Containers) != 1 {
		t.Errorf("%d containers", len(spec.Containers))
	}
	if got := d.SecurityContext.Capabilities.Add; !slices.Equal(got, cleanwalldCapabilities) {
		t.Errorf("cleanwalld adds %v, want exactly %v", got, cleanwalldCapabilities)
	}
	if sc := d.SecurityContext; sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Error("cleanwalld: its capabilities are root's (runAsUser: 0)")
	}
	if sc := d.SecurityContext; sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		t.Error("cleanwalld: allowPrivilegeEscalation false with CAP_SYS_ADMIN is refused by the API")
	}
	flags := checkCommand(t, "cleanwalld", argv(d))

	// The API socket: where the plugin on the host finds it by default.
	socket := flags["socket"]
	if socket != api.DefaultSocket {
		t.Errorf("--socket %q, the plugin's default is %q", socket, api.DefaultSocket)
	}
	hostMount(t, spec, d, filepath.Dir(socket), corev1.MountPropagationNone)
	// Pins on the host's bpffs, which must reach the pod.
	hostMount(t, spec, d, "/sys/fs/bpf", corev1.MountPropagationHostToContainer)
	if root := flags["bpf-root"]; !strings.HasPrefix(root, "/sys/fs/bpf/") {
		t.Errorf("--bpf-root %q is not on the mounted bpffs", root)
	}
	if _, v := mountAt(t, spec, d, "/sys/fs/bpf"); v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectory {
		t.Error("/sys/fs/bpf: want hostPath type Directory (a bpffs the host mounted, never one created)")
	}
	hostMount(t, spec, d, flags["state-dir"], corev1.MountPropagationNone)
	hostMount(t, spec, d, "/var/run/netns", corev1.MountPropagationHostToContainer)
	// Named policies from the ConfigMap.
	m, v := mountAt(t, spec, d, flags["policy-dir"])
	if v.ConfigMap == nil || v.ConfigMap.Name != "cleanwall-policies" || !m.ReadOnly {
		t.Errorf("--policy-dir %s: %+v, want the ConfigMap cleanwall-policies, read-only", flags["policy-dir"], v.VolumeSource)
	}
	find[*corev1.ConfigMap](t, all, "policies.yaml", "ConfigMap", "cleanwall-policies")

	// Metrics on the node's address, named port, Service, ServiceMonitor.
	host, port, err := net.SplitHostPort(flags["metrics-addr"])
	if err != nil || host != "$(NODE_IP)" {
		t.Errorf("--metrics-addr %q: want $(NODE_IP):PORT", flags["metrics-addr"])
	}
	if !slices.ContainsFunc(d.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	}) {
		t.Error("NODE_IP does not come from status.hostIP")
	}
	if len(d.Ports) != 1 || d.Ports[0].Name != "metrics" || strconv.Itoa(int(d.Ports[0].ContainerPort)) != port {
		t.Errorf("ports %+v, want metrics on %s", d.Ports, port)
	}
	svc := find[*corev1.Service](t, all, "cleanwalld.yaml", "Service", "cleanwalld")
	if svc.Spec.ClusterIP != corev1.ClusterIPNone || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != "metrics" ||
		strconv.Itoa(int(svc.Spec.Ports[0].Port)) != port || svc.Spec.Ports[0].Name != "metrics" {
		t.Errorf("Service cleanwalld %+v", svc.Spec)
	}
	for k, want := range svc.Spec.Selector {
		if ds.Spec.Template.Labels[k] != want {
			t.Errorf("Service selector %s=%s does not select the daemons", k, want)
		}
	}
	sm := find[*ServiceMonitor](t, all, "servicemonitor.yaml", "ServiceMonitor", "cleanwalld")
	if sm.APIVersion != "monitoring.coreos.com/v1" || len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" ||
		sm.Spec.Endpoints[0].Path != "/metrics" || !slices.Equal(sm.Spec.NamespaceSelector.MatchNames, []string{svc.Namespace}) {
		t.Errorf("ServiceMonitor %+v", sm.Spec)
	}
	for k, want := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != want {
			t.Errorf("ServiceMonitor selector %s=%s does not select the Service", k, want)
		}
	}
	// The alert rules match job="cleanwalld": the Service's name, unless
	// jobLabel says otherwise.
	if sm.Spec.JobLabel != "" || svc.Name != "cleanwalld" {
		t.Errorf("the scrape job would not be cleanwalld (deploy/prometheus/alerts.yaml)")
	}

	// Probes: cleanwall status over the daemon's socket; liveness only
	// asks that it answers.
	for name, p := range map[string]*corev1.Probe{"startup": d.StartupProbe, "readiness": d.ReadinessProbe, "liveness": d.LivenessProbe} {
		if p == nil || p.Exec == nil {
			t.Errorf("no %s probe (exec)", name)
			continue
		}
		pf := checkCommand(t, name+" probe", p.Exec.Command)
		if p.Exec.Command[1] != "status" || pf["socket"] != socket {
			t.Errorf("%s probe %v: want cleanwall status on %s", name, p.Exec.Command, socket)
		}
		if _, live := pf["live"]; live != (name == "liveness") {
			t.Errorf("%s probe %v: --live is for the liveness probe only", name, p.Exec.Command)
		}
		if p.TimeoutSeconds < 2 || p.PeriodSeconds == 0 {
			t.Errorf("%s probe: timeout %ds, period %ds", name, p.TimeoutSeconds, p.PeriodSeconds)
		}
	}

	// The install step: the host's CNI directories, the daemon's socket.
	in := container(t, spec.InitContainers, "install-cni")
	iflags := checkCommand(t, "install-cni", argv(in))
	if in.Command[1] != "cni" || in.Command[2] != "install" {
		t.Errorf("install-cni runs %v", in.Command)
	}
	if iflags["socket"] != socket {
		t.Errorf("install-cni writes --socket %q into the conflist, the daemon listens on %q", iflags["socket"], socket)
	}
	for flag, host := range map[string]string{"bin-dir": "/opt/cni/bin", "conf-dir": "/etc/cni/net.d"} {
		_, v := mountAt(t, spec, in, iflags[flag])
		if v.HostPath == nil || v.HostPath.Path != host {
			t.Errorf("install-cni --%s %s is not the host's %s", flag, iflags[flag], host)
		}
	}
	if len(in.SecurityContext.Capabilities.Add) != 0 {
		t.Errorf("install-cni adds capabilities %v", in.SecurityContext.Capabilities.Add)
	}

	// The SEV-SNP overlay: the base's args plus the key broker's, its CA
	// mounted, its URL naming the broker's Service.
	patch := find[*appsv1.DaemonSet](t, all, "snp/cleanwalld-snp.yaml", "DaemonSet", "cleanwalld")
	if patch.Namespace != ds.Namespace {
		t.Errorf("the patch is for namespace %q", patch.Namespace)
	}
	pc := container(t, patch.Spec.Template.Spec.Containers, "cleanwalld")
	if n := len(d.Args); len(pc.Args) != n+3 || !slices.Equal(pc.Args[:n], d.Args) {
		t.Fatalf("snp args %v: want the base's %v and the broker's three", pc.Args, d.Args)
	}
	pflags := checkCommand(t, "snp cleanwalld", append(slices.Clone(d.Command), pc.Args...))
	u, err := url.Parse(pflags["keybroker"])
	bsvc := find[*corev1.Service](t, all, "keybroker.yaml", "Service", "cleanwall-keybroker")
	if err != nil || u.Scheme != "https" || u.Hostname() != bsvc.Name+"."+bsvc.Namespace+".svc" || u.Port() != strconv.Itoa(int(bsvc.Spec.Ports[0].Port)) {
		t.Errorf("--keybroker %q does not name the Service %s/%s:%d over https", pflags["keybroker"], bsvc.Namespace, bsvc.Name, bsvc.Spec.Ports[0].Port)
	}
	pspec := patch.Spec.Template.Spec
	if _, v := mountAt(t, pspec, pc, filepath.Dir(pflags["broker-ca"])); v.ConfigMap == nil {
		t.Errorf("--broker-ca %s is not from a ConfigMap", pflags["broker-ca"])
	}
	if pflags["attestation"] != "snp" {
		t.Errorf("--attestation %q", pflags["attestation"])
	}
	hostMount(t, pspec, pc, "/sys/kernel/config", corev1.MountPropagationNone)
}

var policyKey = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?\.yaml$`)

// Every named policy parses and compiles, under the name a pod uses.
func TestNamedPolicies(t *testing.T) {
	cm := find[*corev1.ConfigMap](t, load(t), "policies.yaml", "ConfigMap", "cleanwall-policies")
	if len(cm.Data) == 0 || len(cm.BinaryData) != 0 {
		t.Fatalf("ConfigMap data %d entries, binaryData %d", len(cm.Data), len(cm.BinaryData))
	}
	for key, doc := range cm.Data {
		if !policyKey.MatchString(key) {
			t.Errorf("%s: want <name>.yaml, the name a pod's cleanwall.dev/policy annotation gives", key)
			continue
		}
		p, err := policy.Parse([]byte(doc))
		if err != nil {
			t.Errorf("%s: %v", key, err)
			continue
		}
		if _, err := policy.Compile(p); err != nil {
			t.Errorf("%s: %v", key, err)
		}
		if p.Metadata.Name != strings.TrimSuffix(key, ".yaml") {
			t.Errorf("%s: metadata.name %q: want the key's name", key, p.Metadata.Name)
		}
	}
}

func TestKeyBroker(t *testing.T) {
	all := load(t)
	cm := find[*corev1.ConfigMap](t, all, "keybroker.yaml", "ConfigMap", "cleanwall-keybroker")
	cfg, err := broker.ParseConfig([]byte(cm.Data["keybroker.yaml"]))
	if err != nil {
		t.Fatalf("keybroker.yaml: %v", err)
	}
	if cfg.AllowSimulatedTEE {
		t.Error("allowSimulatedTEE in a deployment")
	}
	dep := find[*appsv1.Deployment](t, all, "keybroker.yaml", "Deployment", "cleanwall-keybroker")
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("replicas %v, strategy %s: want one broker, never two at once (challenges are per process, the store is one volume)", dep.Spec.Replicas, dep.Spec.Strategy.Type)
	}
	spec := dep.Spec.Template.Spec
	if sc := spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		t.Error("the broker must run as a non-root user")
	}
	c := container(t, spec.Containers, "keybroker")
	flags := checkCommand(t, "keybroker", argv(c))
	if m, v := mountAt(t, spec, c, flags["config"]); v.ConfigMap == nil || v.ConfigMap.Name != cm.Name || m.SubPath != "keybroker.yaml" {
		t.Errorf("--config %s is not the ConfigMap's keybroker.yaml", flags["config"])
	}
	if sc := c.SecurityContext; len(sc.Capabilities.Add) != 0 || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("keybroker: capabilities %v, allowPrivilegeEscalation %v", sc.Capabilities.Add, sc.AllowPrivilegeEscalation)
	}
	if _, v := mountAt(t, spec, c, filepath.Dir(cfg.TLS.CertFile)); v.Secret == nil || v.Secret.SecretName != "cleanwall-keybroker-tls" ||
		filepath.Dir(cfg.TLS.KeyFile) != filepath.Dir(cfg.TLS.CertFile) {
		t.Errorf("tls %+v is not the Secret cleanwall-keybroker-tls", cfg.TLS)
	}
	if _, v := mountAt(t, spec, c, cfg.KeyStore.Dir); v.PersistentVolumeClaim == nil {
		t.Errorf("keyStore.dir %s is not on the persistent volume", cfg.KeyStore.Dir)
	} else {
		find[*corev1.PersistentVolumeClaim](t, all, "keybroker.yaml", "PersistentVolumeClaim", v.PersistentVolumeClaim.ClaimName)
	}
	// The master key: from its Secret, through the init container, into
	// memory, mode 0600.
	if _, v := mountAt(t, spec, c, filepath.Dir(cfg.KeyStore.MasterKeyFile)); v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory {
		t.Errorf("masterKeyFile %s is not in memory", cfg.KeyStore.MasterKeyFile)
	}
	in := container(t, spec.InitContainers, "master-key")
	if last := in.Command[len(in.Command)-1]; last != cfg.KeyStore.MasterKeyFile || !slices.Contains(in.Command, "0600") {
		t.Errorf("master-key %v does not write %s, mode 0600", in.Command, cfg.KeyStore.MasterKeyFile)
	}
	if _, v := mountAt(t, spec, in, filepath.Dir(in.Command[len(in.Command)-2])); v.Secret == nil || v.Secret.SecretName != "cleanwall-keybroker-master" {
		t.Errorf("master-key reads %s, not the Secret cleanwall-keybroker-master", in.Command[len(in.Command)-2])
	}
	if add := in.SecurityContext.Capabilities.Add; !slices.Equal(add, []corev1.Capability{"CHOWN"}) {
		t.Errorf("master-key adds %v, want CHOWN only", add)
	}
	// Listener, port, probes, Service.
	_, port, _ := net.SplitHostPort(cfg.Listen)
	if len(c.Ports) != 1 || strconv.Itoa(int(c.Ports[0].ContainerPort)) != port {
		t.Errorf("ports %+v, the broker listens on %s", c.Ports, cfg.Listen)
	}
	for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.TCPSocket == nil || p.TCPSocket.Port.StrVal != c.Ports[0].Name {
			t.Errorf("%s probe: want a TCP probe of %s", name, c.Ports[0].Name)
		}
	}
	svc := find[*corev1.Service](t, all, "keybroker.yaml", "Service", "cleanwall-keybroker")
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != c.Ports[0].Name {
		t.Errorf("Service ports %+v", svc.Spec.Ports)
	}
	for k, want := range svc.Spec.Selector {
		if dep.Spec.Template.Labels[k] != want {
			t.Errorf("Service selector %s=%s does not select the broker", k, want)
		}
	}
}

// TestCapabilitiesSuffice runs `cleanwalld --check` (load and pin the
// datapath, install routing and the nftables wall, open the proxy
// sockets) the way the DaemonSet runs it: root with exactly the manifest's
// capabilities, in a private PID namespace, with the host's bpffs reaching
// its mount namespace as a slave (HostToContainer) of a shared mount (a
// systemd host), in a network namespace of its own (the node's, here). It
// must pass; without PERFMON and SYS_ADMIN it must fail, or the test
// proves nothing about the capabilities.
func TestCapabilitiesSuffice(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tool := range []string{"unshare", "setpriv", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Skip(t, tool+" is not installed (make deps)")
		}
	}
	ds := find[*appsv1.DaemonSet](t, load(t), "cleanwalld.yaml", "DaemonSet", "cleanwalld")
	var caps []string
	for _, c := range container(t, ds.Spec.Template.Spec.Containers, "cleanwalld").SecurityContext.Capabilities.Add {
		caps = append(caps, strings.ToLower(string(c)))
	}
	bin := filepath.Join(binaries(t), "cleanwalld")
	run := func(caps []string) (string, error) {
		dir := t.TempDir()
		pins := fmt.Sprintf("/sys/fs/bpf/cleanwall-k8s-test-%d", os.Getpid())
		defer os.RemoveAll(pins)
		bounding := "-all"
		for _, c := range caps {
			bounding += ",+" + c
		}
		script := `set -e
ip link set lo up
mount --make-shared /sys/fs/bpf
unshare --mount --propagation slave --pid --fork --mount-proc \
  setpriv --inh-caps=-all --bounding-set="$BOUNDING" \
  "$BIN" --check --bpf-root="$PINS" --state-dir="$DIR/state" --socket="$DIR/cleanwalld.sock" --audit-log=-`
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--net", "sh", "-c", script)
		cmd.Env = append(os.Environ(), "BOUNDING="+bounding, "BIN="+bin, "PINS="+pins, "DIR="+dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run(caps)
	if err != nil || !strings.Contains(out, "ok: datapath pinned") {
		t.Fatalf("cleanwalld --check with %v: %v\n%s", caps, err, out)
	}
	fewer := slices.DeleteFunc(slices.Clone(caps), func(c string) bool { return c == "perfmon" || c == "sys_admin" })
	if out, err := run(fewer); err == nil || !strings.Contains(out, "permission denied") && !strings.Contains(out, "operation not permitted") {
		t.Fatalf("cleanwalld --check with %v: %v, want a refusal of the missing capabilities:\n%s", fewer, err, out)
	}
}

package daemon

import (
	"github.com/cleanwall/cleanwall/proxies"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	httpproxy "github.com/cleanwall/cleanwall/proxies/http"
)

// What the daemon logs, audits and streams to observers of a refusal
// inside a flow is the policy's words and the packet's headers, never the
// sandbox's data (docs/telemetry.md).

// safeDenial keeps of a proxy's Denial its reason, status, detail (the
// proxies fill it with policy names: a key id, a server name, a statement's
// fingerprint, a denied column) and method, an unknown method reading
// "other"; the path goes: a request path is the sandbox's data, whoever
// refused it.
func safeDenial(den proxies.Denial) proxies.Denial {
	den.Path = ""
	den.Method = httpproxy.SafeMethod(den.Method)
	return den
}

// safeDNSDenial replaces a refused question's name by the policy's entry
// it matched ("" when none): a name the policy does not list is the
// sandbox's data, and a name under a listed pattern carries the sandbox's
// labels.
func safeDNSDenial(ev dnsproxy.DenyEvent) dnsproxy.DenyEvent {
	ev.Name = ev.Listed
	return ev
}

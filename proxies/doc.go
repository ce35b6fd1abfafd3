// Package proxies holds the transparent listeners and the privacy proxies
// (tcp, http, dns) with their mode codecs. Proxies receive keys through
// interfaces and never import bpf or attest.
package proxies

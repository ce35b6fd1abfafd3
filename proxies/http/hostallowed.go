package httpproxy

// HostAllowed reports whether hostport, a Host value or an absolute-form
// authority, names flow's destination as this proxy decides it for its
// host-mismatch refusal (421): a well-formed host in flow.Hosts, with the
// destination port or, without a port, a destination port of 80. Secure
// mode's HTTP proxy checks Host with it, so that both modes read Host
// alike.
func HostAllowed(flow Flow, hostport string) bool {
	if !validHostPort(hostport) {
		return false
	}
	m, err := newHostMatcher(flow)
	if err != nil {
		return false
	}
	return m.allows(hostport)
}

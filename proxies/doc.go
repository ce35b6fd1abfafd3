// Package proxies holds cleanwall's privacy proxies and what they share.
// The firewall hands each redirected flow to the proxy registered for its
// egress rule's (mode, protocol) through the interface in proxy.go
// (StreamProxy for TCP, PacketProxy for UDP); the proxies are tcp (open
// L4 forwarding), http (open-mode inspection), dns (the governed DNS
// channel), udp (the UDP relay) and extensions that run out of process.
// tproxy owns the transparent sockets the datapath assigns flows to.
//
// Proxies receive keys through KeySource and never import bpf, attest or
// the daemon.
package proxies

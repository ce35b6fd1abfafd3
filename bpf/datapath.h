//go:build ignore

/* Types shared by the datapath programs and, through bpf2go's generated Go
 * declarations, by the daemon. Every map key and value is a named struct so
 * that `bpftool map dump pinned ...` prints field names. */
#ifndef CLEANWALL_DATAPATH_H
#define CLEANWALL_DATAPATH_H

#include <linux/types.h>

/* Verdicts, as counted in cw_counters. */
enum verdict {
	VERDICT_REDIRECT = 1, /* assigned to a cleanwall proxy socket */
	VERDICT_DROP = 2,
	VERDICT_PASS = 3, /* ARP / neighbour discovery with the gateway only */
};

/* Reasons. Keep in sync with the Go names in bpf/reasons.go (a test checks). */
enum reason {
	REASON_NONE = 0,
	/* redirect */
	REASON_RULE = 1,        /* new flow matched an egress rule */
	REASON_ESTABLISHED = 2, /* packet of a flow a proxy already owns */
	REASON_DNS = 3,         /* port 53: the DNS proxy, whatever the destination */
	/* pass */
	REASON_ARP = 10,
	REASON_NDP = 11,
	/* drop */
	REASON_UNKNOWN_SANDBOX = 20,
	REASON_SPOOFED_MAC = 21,
	REASON_SPOOFED_IP = 22,
	REASON_ARP_NOT_GATEWAY = 23,
	REASON_NDP_NOT_GATEWAY = 24,
	REASON_NO_RULE = 25,
	REASON_NO_PROXY = 26,
	REASON_NO_SOCKET = 27,
	REASON_ICMP = 28,
	REASON_FRAGMENT = 29,
	REASON_IP_OPTIONS = 30,
	REASON_IPV6_EXT = 31,
	REASON_PROTOCOL = 32,
	REASON_ETHERTYPE = 33,
	REASON_MALFORMED = 34,
	REASON_EXPIRED = 35,
	REASON_ASSIGN_FAILED = 36,
	REASON_L2_NOT_GATEWAY = 37,
	REASON_UNCLASSIFIED = 38, /* bridge device: a marked packet it cannot assign */
	REASON_TRAILER = 39,      /* bytes after an ARP or ND message (a frame longer than its message) */
	REASON_ARP_FIELD = 40,    /* an ARP field holds what a Linux sandbox never sends there */
	REASON_NDP_FIELD = 41,    /* an ND header field holds what Linux never sends (hop limit, class, flow, code, reserved) */
	REASON_NDP_OPTION = 42,   /* an ND option other than the sandbox's own link-layer address */
	REASON_NDP_DAD = 43,      /* duplicate address detection (NS from ::) */
	REASON_NDP_CHECKSUM = 44, /* an ND message with a wrong ICMPv6 checksum */
	REASON_TIME_WAIT = 45,    /* a SYN met a time-wait socket and no steering program of ours answers */
	REASON_FLOW_LIMIT = 46,   /* a new flow over the sandbox's new-flow rate */
	REASON_DNS_LIMIT = 47,    /* a DNS datagram far over the sandbox's DNS rate */
};

/* Which proxy socket a redirected flow is assigned to (index into the ports
 * of struct config). */
enum listener {
	LISTENER_TCP = 0,
	LISTENER_UDP = 1,
	LISTENER_DNS_UDP = 2,
	LISTENER_DNS_TCP = 3,
};

enum sandbox_flags {
	SANDBOX_HAS_IPV4 = 1 << 0,
	SANDBOX_HAS_IPV6 = 1 << 1,
	/* The host-side veth is a bridge port: classify and mark here, the
	 * program on the bridge device does the socket assignment. */
	SANDBOX_BRIDGE_PORT = 1 << 2,
};

struct sandbox_key {
	__u32 ifindex; /* host-side interface of the sandbox */
};

struct sandbox {
	__u32 sandbox_id; /* daemon-assigned, never 0 */
	__u32 generation; /* active rule generation (0 or 1) */
	__u32 flags;
	__u32 pad0;
	/* Rule epoch: moves forward (CLOCK_MONOTONIC ns, strictly increasing)
	 * on every change of the sandbox's rules, so cached verdicts of older
	 * rule sets never match again. */
	__u64 epoch;
	__u8 mac[6];          /* the sandbox's own MAC */
	__u8 gateway_mac[6];  /* host-side veth or bridge MAC */
	__u8 ipv4[4];
	__u8 gateway_ipv4[4];
	__u8 ipv6[16];
	__u8 ipv6_link_local[16];
	__u8 gateway_ipv6[16];
	__u8 gateway_ipv6_link_local[16];
	char name[64]; /* CNI container ID (truncated) / interface, for bpftool readers */
};

/* LPM trie key: prefixlen covers sandbox_id..port exactly (64 bits) plus the
 * address prefix, so lookups match sandbox, generation, family, protocol and
 * port exactly and the address by longest prefix. */
struct rule_key {
	__u32 prefixlen;
	__u32 sandbox_id;
	__u8 generation;
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
	__u16 port; /* destination port, host byte order */
	__u8 addr[16];
};
#define RULE_KEY_FIXED_BITS 80

struct rule {
	__u32 rule_id; /* 1-based index of the egress rule in the policy */
	__u8 mode;     /* 1 open, 2 trusted, 3 secure */
	__u8 listener; /* enum listener */
	__u16 flags;
	__u64 expires_ns; /* 0: static (cidr); else CLOCK_MONOTONIC ns (fqdn entries) */
};

/* Verdict cache (LRU): what the rule lookup answered for a destination,
 * under one rule epoch of one sandbox. rule_id 0 caches "no rule". */
struct verdict_cache_key {
	__u32 sandbox_id;
	__u8 family;
	__u8 proto;
	__u16 port;
	__u64 epoch;
	__u8 addr[16];
};

struct cached_verdict {
	__u32 rule_id;
	__u8 mode;
	__u8 listener;
	__u16 pad;
	__u64 expires_ns;
};

struct config {
	__u32 redirect_mark; /* skb->mark for redirected packets (fwmark rule) */
	__u32 socket_mark;   /* SO_MARK on every proxy socket: "this socket is ours" */
	__u16 ports[4];      /* proxy listener ports by enum listener; 0 = none */
};

struct counter_key {
	__u32 sandbox_id; /* 0: traffic on an interface no sandbox owns */
	__u32 rule_id;    /* 0 when no rule decided */
	__u8 verdict;
	__u8 reason;
	__u16 pad;
};

struct counter {
	__u64 packets;
	__u64 bytes;
	__u64 flows; /* new-flow packets (TCP SYN, every UDP/ICMP/other packet) */
};

/* A SYN that meets a time-wait socket is handed to that socket, so that the
 * kernel retires it as it would for a direct connection; the listener lookup
 * the kernel then makes for the original destination is answered by
 * steer_listener (sk_lookup) with our proxy listener, for the 4-tuples the
 * tc programs noted here. */
struct steer_key {
	__u8 family; /* 4 or 6 */
	__u8 pad;
	__u16 sport; /* the sandbox's port, host byte order */
	__u16 dport; /* original destination port, host byte order */
	__u16 pad2;
	__u8 saddr[16]; /* the sandbox's address */
	__u8 daddr[16]; /* original destination */
};

struct steer {
	__u64 created_ns; /* CLOCK_MONOTONIC; honoured for STEER_TTL_NS */
	__u8 listener;    /* enum listener */
	__u8 pad[7];
};

/* A sandbox's budget of new flows (TCP SYNs, new UDP flows) or of DNS
 * datagrams, a token bucket kept in nanoseconds of credit: a flow costs cost_ns, the bucket
 * holds at most cap_ns (the burst). The daemon writes cost and cap; the
 * datapath moves credit and last under the lock. No entry: no limit. */
enum budget_kind {
	BUDGET_FLOWS = 0, /* new TCP and UDP flows to the sandbox's rules, DNS over TCP */
	BUDGET_DNS = 1,   /* DNS datagrams (UDP port 53, any destination) */
	BUDGET_EVENTS = 2, /* deny events reported (drops are always counted) */
};

struct flow_rate_key {
	__u32 sandbox_id;
	__u32 kind; /* enum budget_kind */
};

struct flow_rate {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 cost_ns;
	__u64 cap_ns;
	__u64 credit_ns;
	__u64 last_ns; /* CLOCK_MONOTONIC of the last new flow */
};

/* A UDP flow a proxy holds (the daemon notes it when it admits the flow,
 * forgets it when the flow ends): its datagrams take nothing from the
 * budget of new flows. */
struct udp_flow_key {
	__u32 sandbox_id;
	__u8 family;
	__u8 pad;
	__u16 sport;
	__u16 dport;
	__u16 pad2;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct udp_flow {
	__u64 since_ns; /* CLOCK_MONOTONIC when the daemon admitted it */
};

/* Bytes of each reported dropped packet copied into its deny event:
 * Ethernet, IPv6 and TCP headers with options fit. */
#define DENY_SAMPLE_LEN 128

struct deny_event {
	__u64 timestamp_ns;
	__u32 sandbox_id;
	__u32 ifindex;
	__u8 reason;
	__u8 family;
	__u8 proto;
	__u8 pad;
	__u16 src_port;
	__u16 dst_port;
	__u8 src_addr[16];
	__u8 dst_addr[16];
	__u8 src_mac[6];
	__u16 ethertype;
	/* The rule a new flow matched before it was dropped (expired, over
	 * the flow limit); 0 for every other drop. */
	__u32 rule_id;
	__u32 pkt_len;    /* the packet's length from its Ethernet header (skb->len) */
	__u16 sample_len; /* bytes of sample filled: min(pkt_len, DENY_SAMPLE_LEN) */
	__u16 pad2[3];
	/* The packet's first bytes, from its Ethernet header: what a capture
	 * (cleanwall observe --pcap) shows of a dropped packet. */
	__u8 sample[DENY_SAMPLE_LEN];
};

#endif

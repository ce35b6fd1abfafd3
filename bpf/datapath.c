//go:build ignore

/* cleanwall datapath: the egress enforcement of a sandbox.
 *
 * sandbox_egress runs at tcx ingress of the sandbox's host-side veth, i.e. on
 * every frame the sandbox sends. A frame has exactly two fates: it is assigned
 * to a cleanwall proxy socket (bpf_sk_assign + redirect mark, routed locally by
 * the node's fwmark rule) or it is dropped. ARP and IPv6 neighbour discovery
 * with the gateway are the only frames that pass untouched. Every decision is
 * counted per sandbox, rule, verdict and reason; drops emit a deny event.
 *
 * bridge_ingress runs at ingress of a bridge device: with a bridge, an assign
 * on the port does not deliver, so the port's program classifies and marks and
 * this program does the assignment of marked packets (or drops them).
 *
 * steer_listener (sk_lookup, attached to the node's network namespace by the
 * daemon) lets a SYN that meets a time-wait socket of its 4-tuple start a new
 * flow to our listener, as the kernel does for a direct connection (see
 * syn_sock and docs/datapath.md).
 */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define ETH_P_IPV4 0x0800
#define ETH_P_ARP_ 0x0806
#define ETH_P_IPV6_ 0x86DD
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

#define IPV4_MF 0x2000
#define IPV4_OFFSET 0x1fff

#define ICMPV6_RS 133
#define ICMPV6_NS 135
#define ICMPV6_NA 136
#define ND_OPT_SLLA 1
#define ND_OPT_TLLA 2
/* NA flags (router, solicited, override); the other 29 bits are reserved. */
#define ND_NA_FLAGS 0xe0000000

#define AF_INET_ 2
#define AF_INET6_ 10

/* What a Linux sandbox sends, byte for byte (measured on its veth):
 * ARP is eth + 28 bytes, never padded (padding to 60 is done by NIC
 * drivers for the wire; veth does not pad). */
#define ARP_FRAME_LEN 42
#define IPV6_FRAME_HDR_LEN 54 /* eth + IPv6 header */

/* A steering entry is for the SYN being processed: the kernel looks the
 * listener up in the same softirq. Older entries are ignored. */
#define STEER_TTL_NS 1000000000ULL

/* Pull at most this much into the linear area: eth + ipv6 + tcp + slack. */
#define PULL_LEN 128

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sandbox_key);
	__type(value, struct sandbox);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct rule_key);
	__type(value, struct rule);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct verdict_cache_key);
	__type(value, struct cached_verdict);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32); /* array maps keep BTF only with an int key */
	__type(value, struct config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct counter_key);
	__type(value, struct counter);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_events SEC(".maps");

/* 4-tuples of SYNs handed to a time-wait socket, for steer_listener. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct steer_key);
	__type(value, struct steer);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_steer SEC(".maps");

/* Our proxy listeners for steer_listener: index (family 6 ? 4 : 0) +
 * enum listener. Filled by the daemon; a closed socket leaves the map. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_listeners SEC(".maps");

/* New-flow budgets by sandbox (struct flow_rate). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flow_rate_key);
	__type(value, struct flow_rate);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_flow_rate SEC(".maps");

/* UDP flows a proxy holds (written by the daemon): their datagrams take
 * nothing from the budget. LRU: a full map forgets the oldest, whose
 * datagrams then pay again; nothing opens. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct udp_flow_key);
	__type(value, struct udp_flow);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cw_udp_flows SEC(".maps");

/* Force BTF for types only userspace uses. */
const struct deny_event *unused_deny_event __attribute__((unused));
const enum verdict *unused_verdict __attribute__((unused));
const enum reason *unused_reason __attribute__((unused));
const enum listener *unused_listener __attribute__((unused));
const enum sandbox_flags *unused_sandbox_flags __attribute__((unused));
const enum budget_kind *unused_budget_kind __attribute__((unused));

struct eth_hdr {
	__u8 dst[6];
	__u8 src[6];
	__be16 proto;
};

struct arp_hdr {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

struct ipv4_hdr {
	__u8 version_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 proto;
	__be16 check;
	__u8 saddr[4];
	__u8 daddr[4];
};

struct ipv6_hdr {
	__be32 vtc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct tcp_hdr {
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack;
	__u8 doff_res;
	__u8 flags;
	__be16 window;
	__be16 check;
	__be16 urg;
};

struct udp_hdr {
	__be16 sport;
	__be16 dport;
	__be16 len;
	__be16 check;
};

/* ICMPv6 header as neighbour discovery uses it; the 32-bit word after the
 * checksum is reserved (RS, NS) or flags and reserved (NA). */
struct icmp6_hdr {
	__u8 type;
	__u8 code;
	__be16 check;
	__be32 reserved;
};

/* Neighbour solicitation / advertisement: header and target. */
struct nd_msg {
	struct icmp6_hdr icmp;
	__u8 target[16];
};

/* Source / target link-layer address option (Ethernet: 8 bytes). */
struct nd_opt_lla {
	__u8 type;
	__u8 len; /* in units of 8 bytes */
	__u8 mac[6];
};

/* What the classifier learnt about the packet; also the deny event source. */
struct pkt {
	__u32 sandbox_id;
	__u32 ifindex;
	__u32 len;
	__u16 ethertype;
	__u8 family;
	__u8 proto;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 new_flow;
	__u8 src_mac[6];
	__u8 pad[5];
	__u8 saddr[16] __attribute__((aligned(8)));
	__u8 daddr[16];
};

/* Word-sized, branch-free comparisons. Unaligned loads are fine on the
 * architectures we build for, and the verifier does not enforce alignment
 * there; byte loops multiply verifier states. */
static __always_inline int addr6_eq(const void *a, const void *b)
{
	const __u64 *x = a, *y = b;
	return ((x[0] ^ y[0]) | (x[1] ^ y[1])) == 0;
}

static __always_inline int addr4_eq(const void *a, const void *b)
{
	return *(const __u32 *)a == *(const __u32 *)b;
}

static __always_inline int mac_eq(const void *a, const void *b)
{
	return ((*(const __u32 *)a ^ *(const __u32 *)b) | (*(const __u16 *)(a + 4) ^ *(const __u16 *)(b + 4))) == 0;
}

static __always_inline int addr6_is_zero(const void *a)
{
	const __u64 *x = a;
	return (x[0] | x[1]) == 0;
}

/* Count a decision. Drops count every packet as a flow attempt, passes
 * (ARP/ND) none, redirects only the packets that start a flow. */
static __noinline void count(struct pkt *p, __u32 rule_id, __u8 verdict, __u8 reason)
{
	struct counter_key key = {
		.sandbox_id = p->sandbox_id,
		.rule_id = rule_id,
		.verdict = verdict,
		.reason = reason,
	};
	struct counter *c = bpf_map_lookup_elem(&cw_counters, &key);
	if (!c) {
		struct counter zero = {};
		/* A full counter map must never change the verdict: the
		 * update fails, the packet keeps its fate, only the count is lost. */
		bpf_map_update_elem(&cw_counters, &key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&cw_counters, &key);
		if (!c)
			return;
	}
	c->packets++;
	c->bytes += p->len;
	if (verdict == VERDICT_DROP || (verdict == VERDICT_REDIRECT && p->new_flow))
		c->flows++;
}

/* Take one new flow (or DNS datagram) from the sandbox's budget of that
 * kind: 1 if it fits. A sandbox over its rate loses the flow here, in the
 * kernel, before it costs the proxies an accept or a read: that is what
 * keeps a flooding sandbox from starving the others. No budget written: no
 * limit. */
static __noinline int take_budget(__u32 sandbox_id, __u32 kind)
{
	struct flow_rate_key k = {.sandbox_id = sandbox_id, .kind = kind};
	struct flow_rate *r = bpf_map_lookup_elem(&cw_flow_rate, &k);
	if (!r)
		return 1;
	__u64 now = bpf_ktime_get_ns();
	int ok = 0;
	bpf_spin_lock(&r->lock);
	__u64 credit = r->credit_ns + (now - r->last_ns);
	if (credit > r->cap_ns || now < r->last_ns)
		credit = r->cap_ns;
	r->last_ns = now;
	if (credit >= r->cost_ns) {
		credit -= r->cost_ns;
		ok = 1;
	}
	r->credit_ns = credit;
	bpf_spin_unlock(&r->lock);
	return ok;
}

/* Drop and count; report a deny event within the sandbox's event budget
 * (BUDGET_EVENTS): a sandbox dropping packets as fast as it can send them
 * must not make the daemon read as many events. The counters stay exact.
 * The event carries the packet's first DENY_SAMPLE_LEN bytes (from the
 * Ethernet header): only reported drops pay for the copy, never a packet
 * that is redirected or passed. rule_id: the rule a dropped new flow
 * matched (expired entry, flow limit), else 0; the counters keep rule 0. */
static __noinline int drop_rule(struct __sk_buff *skb, struct pkt *p, __u8 reason, __u32 rule_id)
{
	count(p, 0, VERDICT_DROP, reason);
	if (!take_budget(p->sandbox_id, BUDGET_EVENTS))
		return TC_ACT_SHOT;

	struct deny_event *ev = bpf_ringbuf_reserve(&cw_events, sizeof(*ev), 0);
	if (ev) {
		ev->timestamp_ns = bpf_ktime_get_ns();
		ev->sandbox_id = p->sandbox_id;
		ev->ifindex = p->ifindex;
		ev->reason = reason;
		ev->family = p->family;
		ev->proto = p->proto;
		ev->pad = 0;
		ev->src_port = p->sport;
		ev->dst_port = p->dport;
		__builtin_memcpy(ev->src_addr, p->saddr, 16);
		__builtin_memcpy(ev->dst_addr, p->daddr, 16);
		__builtin_memcpy(ev->src_mac, p->src_mac, 6);
		ev->ethertype = p->ethertype;
		ev->rule_id = rule_id;
		ev->pad2[0] = ev->pad2[1] = ev->pad2[2] = 0;
		__u32 len = skb->len;
		ev->pkt_len = len;
		ev->sample_len = 0;
		if (len > DENY_SAMPLE_LEN)
			len = DENY_SAMPLE_LEN;
		/* Bounds the verifier can follow: 1..DENY_SAMPLE_LEN. */
		if (len >= 1 && len <= DENY_SAMPLE_LEN && !bpf_skb_load_bytes(skb, 0, ev->sample, len))
			ev->sample_len = len;
		bpf_ringbuf_submit(ev, 0);
	}
	return TC_ACT_SHOT;
}

static __always_inline int drop(struct __sk_buff *skb, struct pkt *p, __u8 reason)
{
	return drop_rule(skb, p, reason, 0);
}

static __noinline int pass(struct pkt *p, __u8 reason)
{
	count(p, 0, VERDICT_PASS, reason);
	return TC_ACT_OK;
}

/* Fill a socket lookup tuple from the packet's addresses and the given ports. */
static __always_inline __u32 make_tuple(struct bpf_sock_tuple *t, struct pkt *p, __u16 sport, __u16 dport)
{
	if (p->family == 4) {
		__builtin_memcpy(&t->ipv4.saddr, p->saddr, 4);
		__builtin_memcpy(&t->ipv4.daddr, p->daddr, 4);
		t->ipv4.sport = bpf_htons(sport);
		t->ipv4.dport = bpf_htons(dport);
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, p->saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, p->daddr, 16);
	t->ipv6.sport = bpf_htons(sport);
	t->ipv6.dport = bpf_htons(dport);
	return sizeof(t->ipv6);
}

static __always_inline struct bpf_sock *lookup_sock(struct __sk_buff *skb, struct pkt *p, __u16 dport)
{
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, p->sport, dport);
	if (p->proto == PROTO_TCP)
		return bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	return bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
}

/* Headers of a packet may sit in its paged part: bring the first PULL_LEN
 * bytes (or the whole packet) into the linear area, where the program can
 * read them. The caller reloads data and data_end after it. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + PULL_LEN > end && skb->len > (__u32)(end - data))
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
}

/* Addresses and protocol of an IP header the caller bounds-checked; shared
 * by the sandbox program and the bridge program. */
static __always_inline void load_ipv4(struct pkt *p, struct ipv4_hdr *ip)
{
	p->family = 4;
	p->proto = ip->proto;
	__builtin_memcpy(p->saddr, ip->saddr, 4);
	__builtin_memcpy(p->daddr, ip->daddr, 4);
}

static __always_inline void load_ipv6(struct pkt *p, struct ipv6_hdr *ip)
{
	p->family = 6;
	p->proto = ip->nexthdr;
	__builtin_memcpy(p->saddr, ip->saddr, 16);
	__builtin_memcpy(p->daddr, ip->daddr, 16);
}

/* Ports and new-flow flag of the TCP or UDP header at l4: -1 when it is
 * truncated (or a TCP header shorter than 20 bytes). */
static __always_inline int load_ports(struct pkt *p, void *l4, void *end)
{
	if (p->proto == PROTO_TCP) {
		struct tcp_hdr *th = l4;
		if ((void *)(th + 1) > end || (th->doff_res >> 4) < 5)
			return -1;
		p->sport = bpf_ntohs(th->sport);
		p->dport = bpf_ntohs(th->dport);
		p->new_flow = (th->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		return 0;
	}
	struct udp_hdr *uh = l4;
	if ((void *)(uh + 1) > end)
		return -1;
	p->sport = bpf_ntohs(uh->sport);
	p->dport = bpf_ntohs(uh->dport);
	p->new_flow = 1;
	return 0;
}

/* Assign the packet to sk (ours, checked by the caller), or on a bridge port
 * only mark it for bridge_ingress. Consumes the socket reference. */
static __always_inline int redirect(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct config *cfg,
				    struct bpf_sock *sk, __u32 rule_id, __u8 listener, __u8 reason)
{
	if (!(sb->flags & SANDBOX_BRIDGE_PORT)) {
		long err = bpf_sk_assign(skb, sk, 0);
		bpf_sk_release(sk);
		if (err)
			return drop(skb, p, REASON_ASSIGN_FAILED);
	} else {
		bpf_sk_release(sk);
	}
	skb->mark = cfg->redirect_mark | listener;
	count(p, rule_id, VERDICT_REDIRECT, reason);
	return TC_ACT_OK;
}

static __always_inline __u8 default_listener(struct pkt *p)
{
	if (p->dport == 53)
		return p->proto == PROTO_TCP ? LISTENER_DNS_TCP : LISTENER_DNS_UDP;
	return p->proto == PROTO_TCP ? LISTENER_TCP : LISTENER_UDP;
}

/* Find our proxy socket for a new flow: the listener of its kind. */
static __always_inline struct bpf_sock *listener_sock(struct __sk_buff *skb, struct pkt *p, struct config *cfg,
						      __u8 listener)
{
	__u16 port = cfg->ports[listener & 3];
	if (!port)
		return NULL;
	struct bpf_sock *sk = lookup_sock(skb, p, port);
	if (!sk)
		return NULL;
	if (sk->mark != cfg->socket_mark || (p->proto == PROTO_TCP && sk->state != BPF_TCP_LISTEN)) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* The socket of the packet's own 4-tuple that must see it, if any:
 * - an established socket carrying our socket mark;
 * - a request socket (handshake in progress; it has no mark to check, but a
 *   request socket whose peer is the sandbox exists only if one of our
 *   listeners took the sandbox's SYN: every other SYN is dropped). The ACK
 *   completing a handshake must be assigned to the request socket itself:
 *   assigned to the listener, the kernel would skip the request lookup and
 *   answer with a reset;
 * - a time-wait socket (the remains of a flow a proxy closed first). The
 *   kernel's time-wait processing only answers (ACK, RST) or retires it,
 *   never delivers data, so any packet of that 4-tuple may go to it; a SYN
 *   is a new flow, which the caller judges (see syn_sock).
 * Listeners found here matched a wildcard address by port number only (a
 * node service): ignored. */
static __always_inline struct bpf_sock *flow_sock(struct __sk_buff *skb, struct pkt *p, struct config *cfg)
{
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, p->sport, p->dport);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return NULL;
	if (sk->state == BPF_TCP_NEW_SYN_RECV || sk->state == BPF_TCP_TIME_WAIT)
		return sk;
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	struct bpf_sock *full = bpf_sk_fullsock(sk);
	if (!full || full->mark != cfg->socket_mark) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* Note a SYN's 4-tuple for steer_listener, and prove that the program
 * answers before relying on it: the probe is the same lookup with source
 * port 0, which no socket uses, so it skips the established hash and
 * reaches the listener lookup, where steer_listener must return our
 * listener. Without that program (detached, never attached) the kernel
 * would give the SYN to whatever listens on the original port of the node:
 * a node service. Returns 0 when the steering answers. */
static __always_inline int steer_syn(struct __sk_buff *skb, struct pkt *p, struct config *cfg, __u8 listener)
{
	struct steer_key k = {.family = p->family, .sport = p->sport, .dport = p->dport};
	__builtin_memcpy(k.saddr, p->saddr, 16);
	__builtin_memcpy(k.daddr, p->daddr, 16);
	struct steer v = {.created_ns = bpf_ktime_get_ns(), .listener = listener};
	if (bpf_map_update_elem(&cw_steer, &k, &v, BPF_ANY))
		return -1;
	k.sport = 0;
	if (bpf_map_update_elem(&cw_steer, &k, &v, BPF_ANY))
		return -1;
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, 0, p->dport);
	struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	bpf_map_delete_elem(&cw_steer, &k); /* consumed by steer_listener if it ran */
	if (!sk)
		return -1;
	int ours = sk->mark == cfg->socket_mark && sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return ours ? 0 : -1;
}

/* The socket a new flow's SYN goes to when a time-wait socket held its
 * 4-tuple: assigned to the listener l, the kernel would refuse the request
 * socket it creates (the 4-tuple is taken in the established hash) and
 * drop the SYN without a word. Assigned to the time-wait socket, the SYN
 * gets what it would get on a direct connection: an acceptable SYN retires
 * the time-wait socket and goes to the listener the kernel looks up, which
 * steer_listener makes ours; another is answered with an ACK. Consumes l;
 * NULL: drop (no steering program of ours answers). */
static __always_inline struct bpf_sock *syn_sock(struct __sk_buff *skb, struct pkt *p, struct config *cfg,
						 __u8 listener, struct bpf_sock *l)
{
	/* One socket reference at a time: the verifier cannot follow two
	 * through the branches the compiler merges. */
	bpf_sk_release(l);
	if (steer_syn(skb, p, cfg, listener))
		return NULL;
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, p->sport, p->dport);
	struct bpf_sock *tw = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (tw) {
		if (tw->state == BPF_TCP_TIME_WAIT)
			return tw;
		bpf_sk_release(tw);
	}
	/* It expired meanwhile (the 4-tuple is free), or a duplicate SYN
	 * took it (the kernel drops this one): the listener, as usual. */
	return listener_sock(skb, p, cfg, listener);
}

/* A UDP datagram of a flow a proxy holds (the daemon notes it in
 * cw_udp_flows when it admits the flow and forgets it when the flow ends)
 * passes; any other takes from the budget of new flows. 1: allowed. */
static __always_inline int take_udp_flow(struct pkt *p)
{
	struct udp_flow_key k = {.sandbox_id = p->sandbox_id, .family = p->family, .sport = p->sport, .dport = p->dport};
	__builtin_memcpy(k.saddr, p->saddr, 16);
	__builtin_memcpy(k.daddr, p->daddr, 16);
	if (bpf_map_lookup_elem(&cw_udp_flows, &k))
		return 1;
	return take_budget(p->sandbox_id, BUDGET_FLOWS);
}

/* The rule verdict for a new flow: from the verdict cache when this
 * sandbox's current rule epoch has seen the destination, else from the
 * LPM trie (the cost of which grows with the depth of the trie), cached. */
static __always_inline void rule_verdict(struct pkt *p, struct sandbox *sb, struct cached_verdict *out)
{
	struct verdict_cache_key vk = {
		.sandbox_id = p->sandbox_id,
		.family = p->family,
		.proto = p->proto,
		.port = p->dport,
		.epoch = sb->epoch,
	};
	__builtin_memcpy(vk.addr, p->daddr, 16);
	struct cached_verdict *cached = bpf_map_lookup_elem(&cw_verdicts, &vk);
	if (cached) {
		*out = *cached;
		return;
	}
	struct rule_key key = {
		.prefixlen = RULE_KEY_FIXED_BITS + (p->family == 4 ? 32 : 128),
		.sandbox_id = p->sandbox_id,
		.generation = (__u8)sb->generation,
		.family = p->family,
		.proto = p->proto,
		.port = p->dport,
	};
	__builtin_memcpy(key.addr, p->daddr, 16);
	struct cached_verdict v = {};
	struct rule *r = bpf_map_lookup_elem(&cw_rules, &key);
	if (r) {
		v.rule_id = r->rule_id;
		v.mode = r->mode;
		v.listener = r->listener;
		v.expires_ns = r->expires_ns;
	}
	/* A full cache only evicts: the verdict above stands either way. */
	bpf_map_update_elem(&cw_verdicts, &vk, &v, BPF_ANY);
	*out = v;
}

static __always_inline int classify_l4(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, void *l4,
				       void *end)
{
	__u32 ck = 0;
	struct config *cfg = bpf_map_lookup_elem(&cw_config, &ck);
	if (!cfg)
		return drop(skb, p, REASON_NO_PROXY);
	if (load_ports(p, l4, end))
		return drop(skb, p, REASON_MALFORMED);

	__u8 time_wait = 0;
	if (p->proto == PROTO_TCP) {
		struct bpf_sock *sk = flow_sock(skb, p, cfg);
		if (sk) {
			/* A SYN meeting a time-wait socket starts a new flow,
			 * judged as any other. */
			if (!p->new_flow || sk->state != BPF_TCP_TIME_WAIT)
				return redirect(skb, p, sb, cfg, sk, 0, default_listener(p), REASON_ESTABLISHED);
			bpf_sk_release(sk);
			time_wait = 1;
		} else if (!p->new_flow) {
			return drop(skb, p, REASON_NO_SOCKET);
		}
	}
	if (p->sport == 0 || p->dport == 0)
		return drop(skb, p, REASON_MALFORMED);

	__u32 rule_id = 0;
	__u8 listener = default_listener(p);
	__u8 reason = REASON_DNS;
	if (p->dport != 53) {
		struct cached_verdict v;
		rule_verdict(p, sb, &v);
		if (!v.rule_id)
			return drop(skb, p, REASON_NO_RULE);
		if (v.expires_ns && bpf_ktime_get_ns() > v.expires_ns)
			return drop_rule(skb, p, REASON_EXPIRED, v.rule_id);
		rule_id = v.rule_id;
		listener = v.listener;
		reason = REASON_RULE;
		/* Here every TCP packet is a SYN: established ones went to
		 * their socket above. */
		if (!(p->proto == PROTO_UDP ? take_udp_flow(p) : take_budget(p->sandbox_id, BUDGET_FLOWS)))
			return drop_rule(skb, p, REASON_FLOW_LIMIT, v.rule_id);
	} else if (p->proto == PROTO_UDP) {
		/* Every DNS datagram is a query: far over the DNS proxy's own
		 * rate limit, it is not worth a read. */
		if (!take_budget(p->sandbox_id, BUDGET_DNS))
			return drop(skb, p, REASON_DNS_LIMIT);
	} else if (!take_budget(p->sandbox_id, BUDGET_FLOWS)) {
		return drop(skb, p, REASON_FLOW_LIMIT);
	}

	struct bpf_sock *sk = listener_sock(skb, p, cfg, listener);
	if (!sk)
		return drop(skb, p, REASON_NO_PROXY);
	/* On a bridge port the bridge program assigns, time-wait included. */
	if (time_wait && !(sb->flags & SANDBOX_BRIDGE_PORT)) {
		sk = syn_sock(skb, p, cfg, listener, sk);
		if (!sk)
			return drop(skb, p, REASON_TIME_WAIT);
	}
	return redirect(skb, p, sb, cfg, sk, rule_id, listener, reason);
}

/* ARP: what the sandbox's kernel needs to reach its gateway, and nothing
 * a sandbox could use to talk to another one on a bridge (broadcasts are
 * flooded to every port): a request for the gateway (target MAC zero,
 * to the broadcast or the gateway MAC) or a reply to the gateway, from the
 * sandbox's own MAC and IP, exactly 42 bytes. A 60-byte frame padded with
 * zeros is refused too: veth never pads (NIC drivers pad for the wire), so
 * a Linux sandbox never sends one, and the choice between 42 and 60 would
 * be a bit per flooded broadcast that the sender picks. */
static __always_inline int handle_arp(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb,
				      struct eth_hdr *eth, void *end)
{
	struct arp_hdr *a = (void *)(eth + 1);
	if ((void *)(a + 1) > end)
		return drop(skb, p, REASON_MALFORMED);
	if (!(sb->flags & SANDBOX_HAS_IPV4))
		return drop(skb, p, REASON_ARP_NOT_GATEWAY);
	if (skb->len != ARP_FRAME_LEN)
		return drop(skb, p, REASON_TRAILER);
	if (a->htype != bpf_htons(1) || a->ptype != bpf_htons(ETH_P_IPV4) || a->hlen != 6 || a->plen != 4)
		return drop(skb, p, REASON_ARP_FIELD);
	if (!mac_eq(a->sha, sb->mac))
		return drop(skb, p, REASON_SPOOFED_MAC);
	/* A sender address 0.0.0.0 is an address conflict probe (RFC 5227),
	 * which only user space sends: addresses come from IPAM. */
	if (*(__u32 *)a->spa == 0)
		return drop(skb, p, REASON_ARP_FIELD);
	if (!addr4_eq(a->spa, sb->ipv4))
		return drop(skb, p, REASON_SPOOFED_IP);
	if (!addr4_eq(a->tpa, sb->gateway_ipv4))
		return drop(skb, p, REASON_ARP_NOT_GATEWAY);
	__u8 zero[8] = {};
	if (a->op == bpf_htons(1)) {
		__u8 bcast[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
		if (!mac_eq(a->tha, zero))
			return drop(skb, p, REASON_ARP_FIELD);
		if (!mac_eq(eth->dst, bcast) && !mac_eq(eth->dst, sb->gateway_mac))
			return drop(skb, p, REASON_L2_NOT_GATEWAY);
		return pass(p, REASON_ARP);
	}
	if (a->op == bpf_htons(2)) {
		if (!mac_eq(a->tha, sb->gateway_mac))
			return drop(skb, p, REASON_ARP_NOT_GATEWAY);
		if (!mac_eq(eth->dst, sb->gateway_mac))
			return drop(skb, p, REASON_L2_NOT_GATEWAY);
		return pass(p, REASON_ARP);
	}
	return drop(skb, p, REASON_ARP_FIELD);
}

static __always_inline int handle_ipv4(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct eth_hdr *eth,
				       void *end)
{
	struct ipv4_hdr *ip = (void *)(eth + 1);
	p->family = 4;
	if ((void *)(ip + 1) > end)
		return drop(skb, p, REASON_MALFORMED);
	load_ipv4(p, ip);
	if ((ip->version_ihl >> 4) != 4 || (ip->version_ihl & 0xf) < 5)
		return drop(skb, p, REASON_MALFORMED);
	if (bpf_ntohs(ip->tot_len) < sizeof(*ip) || bpf_ntohs(ip->tot_len) > skb->len - sizeof(*eth))
		return drop(skb, p, REASON_MALFORMED);
	if (!(sb->flags & SANDBOX_HAS_IPV4) || !addr4_eq(p->saddr, sb->ipv4))
		return drop(skb, p, REASON_SPOOFED_IP);
	if (!mac_eq(eth->dst, sb->gateway_mac))
		return drop(skb, p, REASON_L2_NOT_GATEWAY);
	/* Fragments carry no (or only partial) ports: never redirect them. */
	if (ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET))
		return drop(skb, p, REASON_FRAGMENT);
	if ((ip->version_ihl & 0xf) != 5)
		return drop(skb, p, REASON_IP_OPTIONS);
	if (ip->proto == PROTO_TCP || ip->proto == PROTO_UDP)
		return classify_l4(skb, p, sb, ip + 1, end);
	if (ip->proto == PROTO_ICMP)
		return drop(skb, p, REASON_ICMP);
	return drop(skb, p, REASON_PROTOCOL);
}

static __always_inline int is_ipv6_ext(__u8 nh)
{
	switch (nh) {
	case 0:   /* hop-by-hop */
	case 43:  /* routing */
	case 44:  /* fragment */
	case 50:  /* ESP */
	case 51:  /* AH */
	case 59:  /* no next header */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253:
	case 254:
		return 1;
	}
	return 0;
}

/* Solicited-node multicast address of target: ff02::1:ffXX:XXXX. */
static __always_inline int is_solicited_node(const __u8 *dst, const __u8 *target)
{
	__u8 want[16] = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff};
	want[13] = target[13];
	want[14] = target[14];
	want[15] = target[15];
	return addr6_eq(dst, want);
}

/* One of the gateway's IPv6 addresses (never the unspecified address). */
static __always_inline int is_gateway6(struct sandbox *sb, const void *a)
{
	if (addr6_is_zero(a))
		return 0;
	return addr6_eq(a, sb->gateway_ipv6_link_local) ||
	       ((sb->flags & SANDBOX_HAS_IPV6) && addr6_eq(a, sb->gateway_ipv6));
}

/* One of the sandbox's own IPv6 addresses (never the unspecified address). */
static __always_inline int is_own6(struct sandbox *sb, const void *a)
{
	if (addr6_is_zero(a))
		return 0;
	return addr6_eq(a, sb->ipv6_link_local) || ((sb->flags & SANDBOX_HAS_IPV6) && addr6_eq(a, sb->ipv6));
}

/* A link-layer address option of the given type carrying the sandbox's MAC. */
static __always_inline int own_lla(struct nd_opt_lla *o, __u8 type, struct sandbox *sb)
{
	return o->type == type && o->len == 1 && mac_eq(o->mac, sb->mac);
}

/* The ICMPv6 checksum of the len-byte ND message at msg (8, 16, 24 or 32
 * bytes, all in the linear area). A wrong checksum is 16 bits the sender
 * chose, on frames a bridge floods. */
static __always_inline int nd_checksum_ok(struct pkt *p, void *msg, __u32 len, void *end)
{
	struct {
		__u8 src[16];
		__u8 dst[16];
		__be32 len;
		__be32 next;
	} ph = {};
	__builtin_memcpy(ph.src, p->saddr, 16);
	__builtin_memcpy(ph.dst, p->daddr, 16);
	ph.len = bpf_htonl(len);
	ph.next = bpf_htonl(PROTO_ICMPV6);
	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return 0;
	if (len == 8 && msg + 8 <= end)
		sum = bpf_csum_diff(NULL, 0, msg, 8, (__u32)sum);
	else if (len == 16 && msg + 16 <= end)
		sum = bpf_csum_diff(NULL, 0, msg, 16, (__u32)sum);
	else if (len == 24 && msg + 24 <= end)
		sum = bpf_csum_diff(NULL, 0, msg, 24, (__u32)sum);
	else if (len == 32 && msg + 32 <= end)
		sum = bpf_csum_diff(NULL, 0, msg, 32, (__u32)sum);
	else
		return 0;
	if (sum < 0)
		return 0;
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s == 0xffff;
}

/* Neighbour discovery: only what the sandbox's kernel needs to reach its
 * gateway, byte for byte what Linux sends (ndisc.c), so that a sandbox
 * cannot hand another one on a bridge anything it chose: multicast frames
 * (router and multicast neighbour solicitations) are flooded to every port.
 *   RS  to ff02::2 (33:33:00:00:00:02), at most an SLLA with its own MAC;
 *   NS  for a gateway address, to that address (gateway MAC) or its
 *       solicited-node group (33:33:ff:xx:xx:xx), at most an SLLA with its
 *       own MAC; never from :: (duplicate address detection);
 *   NA  of its own address, to a gateway address (gateway MAC), at most a
 *       TLLA with its own MAC.
 * Every one: traffic class and flow label 0, hop limit 255, code 0,
 * reserved bits 0, a correct checksum, and no byte after the message. */
static __always_inline int handle_ndp(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct eth_hdr *eth,
				      struct ipv6_hdr *ip, void *end)
{
	struct icmp6_hdr *ic = (void *)(ip + 1);
	if ((void *)(ic + 1) > end)
		return drop(skb, p, REASON_MALFORMED);
	__u8 type = ic->type;
	if (type != ICMPV6_RS && type != ICMPV6_NS && type != ICMPV6_NA)
		return drop(skb, p, REASON_ICMP);

	int src_any = addr6_is_zero(p->saddr);
	if (!src_any && !is_own6(sb, p->saddr))
		return drop(skb, p, REASON_SPOOFED_IP);
	/* RFC 4861: hop limit 255 and code 0; Linux: class and flow label 0. */
	if (ip->vtc_flow != bpf_htonl(0x60000000) || ip->hop_limit != 255 || ic->code != 0)
		return drop(skb, p, REASON_NDP_FIELD);
	__u32 len = bpf_ntohs(ip->payload_len);
	if (skb->len != IPV6_FRAME_HDR_LEN + len)
		return drop(skb, p, REASON_TRAILER);

	if (type == ICMPV6_RS) {
		__u8 all_routers[16] = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02};
		__u8 all_routers_mac[8] = {0x33, 0x33, 0, 0, 0, 0x02};
		if (!addr6_eq(p->daddr, all_routers))
			return drop(skb, p, REASON_NDP_NOT_GATEWAY);
		if (!mac_eq(eth->dst, all_routers_mac))
			return drop(skb, p, REASON_L2_NOT_GATEWAY);
		if (ic->reserved)
			return drop(skb, p, REASON_NDP_FIELD);
		if (len == sizeof(*ic) + sizeof(struct nd_opt_lla)) {
			struct nd_opt_lla *o = (void *)(ic + 1);
			if ((void *)(o + 1) > end)
				return drop(skb, p, REASON_MALFORMED);
			/* RFC 4861 6.1.1: no SLLA from the unspecified address. */
			if (src_any || !own_lla(o, ND_OPT_SLLA, sb))
				return drop(skb, p, REASON_NDP_OPTION);
		} else if (len != sizeof(*ic)) {
			return drop(skb, p, REASON_NDP_OPTION);
		}
		if (!nd_checksum_ok(p, ic, len, end))
			return drop(skb, p, REASON_NDP_CHECKSUM);
		return pass(p, REASON_NDP);
	}

	struct nd_msg *m = (void *)ic;
	if ((void *)(m + 1) > end)
		return drop(skb, p, REASON_MALFORMED);
	__u8 target[16];
	__builtin_memcpy(target, m->target, 16);
	struct nd_opt_lla *o = (void *)(m + 1);
	__u8 opt_type;

	if (type == ICMPV6_NS) {
		/* Duplicate address detection is the one NS from ::. Dropping it
		 * is safe: DAD only fails on an answer, silence means unique,
		 * and IPAM hands out unique addresses. */
		if (src_any)
			return drop(skb, p, REASON_NDP_DAD);
		if (!is_gateway6(sb, target))
			return drop(skb, p, REASON_NDP_NOT_GATEWAY);
		if (addr6_eq(p->daddr, target)) {
			/* unicast: reachability probe of the gateway */
			if (!mac_eq(eth->dst, sb->gateway_mac))
				return drop(skb, p, REASON_L2_NOT_GATEWAY);
		} else if (is_solicited_node(p->daddr, target)) {
			__u8 group_mac[8] = {0x33, 0x33, 0xff, target[13], target[14], target[15]};
			if (!mac_eq(eth->dst, group_mac))
				return drop(skb, p, REASON_L2_NOT_GATEWAY);
		} else {
			return drop(skb, p, REASON_NDP_NOT_GATEWAY);
		}
		if (m->icmp.reserved)
			return drop(skb, p, REASON_NDP_FIELD);
		opt_type = ND_OPT_SLLA;
	} else {
		/* Neighbour advertisement: of its own address, to the gateway
		 * only (an unsolicited one to all nodes reaches every port). */
		if (src_any || !is_own6(sb, target))
			return drop(skb, p, REASON_NDP_NOT_GATEWAY);
		if (!is_gateway6(sb, p->daddr))
			return drop(skb, p, REASON_NDP_NOT_GATEWAY);
		if (!mac_eq(eth->dst, sb->gateway_mac))
			return drop(skb, p, REASON_L2_NOT_GATEWAY);
		if (m->icmp.reserved & ~bpf_htonl(ND_NA_FLAGS))
			return drop(skb, p, REASON_NDP_FIELD);
		opt_type = ND_OPT_TLLA;
	}
	if (len == sizeof(*m) + sizeof(*o)) {
		if ((void *)(o + 1) > end)
			return drop(skb, p, REASON_MALFORMED);
		if (!own_lla(o, opt_type, sb))
			return drop(skb, p, REASON_NDP_OPTION);
	} else if (len != sizeof(*m)) {
		return drop(skb, p, REASON_NDP_OPTION);
	}
	if (!nd_checksum_ok(p, m, len, end))
		return drop(skb, p, REASON_NDP_CHECKSUM);
	return pass(p, REASON_NDP);
}

static __always_inline int handle_ipv6(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct eth_hdr *eth,
				       void *end)
{
	struct ipv6_hdr *ip = (void *)(eth + 1);
	p->family = 6;
	if ((void *)(ip + 1) > end)
		return drop(skb, p, REASON_MALFORMED);
	load_ipv6(p, ip);
	if ((bpf_ntohl(ip->vtc_flow) >> 28) != 6)
		return drop(skb, p, REASON_MALFORMED);
	if (bpf_ntohs(ip->payload_len) > skb->len - sizeof(*eth) - sizeof(*ip))
		return drop(skb, p, REASON_MALFORMED);

	if (ip->nexthdr == PROTO_ICMPV6)
		return handle_ndp(skb, p, sb, eth, ip, end);

	/* The sandbox's own link-local address, and the unspecified address
	 * during duplicate address detection, are not spoofs: its kernel sends
	 * MLD reports from them, behind a hop-by-hop header. Such packets drop
	 * for what they are. TCP and UDP must come from the global address. */
	int from_global = (sb->flags & SANDBOX_HAS_IPV6) && addr6_eq(p->saddr, sb->ipv6);
	if (!from_global && !addr6_eq(p->saddr, sb->ipv6_link_local) && !addr6_is_zero(p->saddr))
		return drop(skb, p, REASON_SPOOFED_IP);
	if (is_ipv6_ext(ip->nexthdr))
		return drop(skb, p, REASON_IPV6_EXT);
	if (ip->nexthdr != PROTO_TCP && ip->nexthdr != PROTO_UDP)
		return drop(skb, p, REASON_PROTOCOL);
	if (!from_global)
		return drop(skb, p, REASON_SPOOFED_IP);
	if (!mac_eq(eth->dst, sb->gateway_mac))
		return drop(skb, p, REASON_L2_NOT_GATEWAY);
	return classify_l4(skb, p, sb, ip + 1, end);
}

SEC("tc")
int sandbox_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	p.ifindex = skb->ifindex;
	p.len = skb->len;

	struct sandbox_key key = {.ifindex = skb->ifindex};
	struct sandbox *sb = bpf_map_lookup_elem(&cw_sandboxes, &key);
	if (!sb)
		return drop(skb, &p, REASON_UNKNOWN_SANDBOX);
	p.sandbox_id = sb->sandbox_id;

	/* A VLAN tag held in skb metadata is a frame we do not classify. */
	if (skb->vlan_present)
		return drop(skb, &p, REASON_ETHERTYPE);

	pull_headers(skb);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	struct eth_hdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(skb, &p, REASON_MALFORMED);
	__builtin_memcpy(p.src_mac, eth->src, 6);
	p.ethertype = bpf_ntohs(eth->proto);
	if (!mac_eq(eth->src, sb->mac))
		return drop(skb, &p, REASON_SPOOFED_MAC);

	switch (p.ethertype) {
	case ETH_P_ARP_:
		return handle_arp(skb, &p, sb, eth, end);
	case ETH_P_IPV4:
		return handle_ipv4(skb, &p, sb, eth, end);
	case ETH_P_IPV6_:
		return handle_ipv6(skb, &p, sb, eth, end);
	}
	return drop(skb, &p, REASON_ETHERTYPE);
}

/* Find the socket of a packet the bridge port already classified and
 * marked, with the parsing helpers of sandbox_egress (which validated the
 * headers), and assign it. The port program's parse does not travel with
 * the packet (its mark tells only that it was classified, and for which
 * listener kind), so addresses and ports are read again here, once. */
SEC("tc")
int bridge_ingress(struct __sk_buff *skb)
{
	__u32 ck = 0;
	struct config *cfg = bpf_map_lookup_elem(&cw_config, &ck);
	if (!cfg || !cfg->redirect_mark)
		return TC_ACT_OK;
	__u32 mask = ~(__u32)0xff;
	if ((skb->mark & mask) != cfg->redirect_mark)
		return TC_ACT_OK;

	struct pkt p = {};
	p.ifindex = skb->ifindex;
	p.len = skb->len;
	__u8 listener = skb->mark & 3;

	pull_headers(skb);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct eth_hdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(skb, &p, REASON_UNCLASSIFIED);
	p.ethertype = bpf_ntohs(eth->proto);
	void *l4;
	if (p.ethertype == ETH_P_IPV4) {
		struct ipv4_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(skb, &p, REASON_UNCLASSIFIED);
		load_ipv4(&p, ip);
		l4 = ip + 1;
	} else if (p.ethertype == ETH_P_IPV6_) {
		struct ipv6_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(skb, &p, REASON_UNCLASSIFIED);
		load_ipv6(&p, ip);
		l4 = ip + 1;
	} else {
		return drop(skb, &p, REASON_UNCLASSIFIED);
	}
	if ((p.proto != PROTO_TCP && p.proto != PROTO_UDP) || load_ports(&p, l4, end))
		return drop(skb, &p, REASON_UNCLASSIFIED);

	struct bpf_sock *sk = NULL;
	__u8 time_wait = 0;
	if (p.proto == PROTO_TCP) {
		sk = flow_sock(skb, &p, cfg);
		if (sk && p.new_flow && sk->state == BPF_TCP_TIME_WAIT) {
			bpf_sk_release(sk);
			sk = NULL;
			time_wait = 1;
		}
	}
	if (!sk && (p.new_flow || p.proto == PROTO_UDP))
		sk = listener_sock(skb, &p, cfg, listener);
	if (!sk)
		return drop(skb, &p, REASON_UNCLASSIFIED);
	if (time_wait) {
		sk = syn_sock(skb, &p, cfg, listener, sk);
		if (!sk)
			return drop(skb, &p, REASON_TIME_WAIT);
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return drop(skb, &p, REASON_ASSIGN_FAILED);
	return TC_ACT_OK;
}

/* sk_lookup, attached to the node's network namespace by the daemon. For a
 * 4-tuple a tc program noted in cw_steer (a SYN it handed to a time-wait
 * socket) within STEER_TTL_NS, the listener lookup the kernel makes for the
 * original destination answers with our proxy listener of the noted kind;
 * with none of ours (the daemon is gone) it fails, rather than fall back to
 * a node service on the original port. Every other lookup is left alone. */
SEC("sk_lookup")
int steer_listener(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != PROTO_TCP)
		return SK_PASS;
	struct steer_key k = {};
	__u32 *src = (__u32 *)k.saddr, *dst = (__u32 *)k.daddr;
	if (ctx->family == AF_INET_) {
		k.family = 4;
		src[0] = ctx->remote_ip4;
		dst[0] = ctx->local_ip4;
	} else if (ctx->family == AF_INET6_) {
		k.family = 6;
		src[0] = ctx->remote_ip6[0];
		src[1] = ctx->remote_ip6[1];
		src[2] = ctx->remote_ip6[2];
		src[3] = ctx->remote_ip6[3];
		dst[0] = ctx->local_ip6[0];
		dst[1] = ctx->local_ip6[1];
		dst[2] = ctx->local_ip6[2];
		dst[3] = ctx->local_ip6[3];
	} else {
		return SK_PASS;
	}
	k.sport = bpf_ntohs(ctx->remote_port);
	k.dport = ctx->local_port;
	struct steer *v = bpf_map_lookup_elem(&cw_steer, &k);
	if (!v)
		return SK_PASS;
	__u64 created = v->created_ns;
	__u32 idx = (k.family == 6 ? 4 : 0) + (v->listener & 3);
	bpf_map_delete_elem(&cw_steer, &k);
	if (bpf_ktime_get_ns() - created > STEER_TTL_NS)
		return SK_PASS;
	struct bpf_sock *sk = bpf_map_lookup_elem(&cw_listeners, &idx);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

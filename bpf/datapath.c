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

/* Force BTF for types only userspace uses. */
const struct deny_event *unused_deny_event __attribute__((unused));
const enum verdict *unused_verdict __attribute__((unused));
const enum reason *unused_reason __attribute__((unused));
const enum listener *unused_listener __attribute__((unused));
const enum sandbox_flags *unused_sandbox_flags __attribute__((unused));

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

/* Neighbour solicitation / advertisement: the fixed part we inspect. */
struct nd_hdr {
	__u8 type;
	__u8 code;
	__be16 check;
	__be32 reserved;
	__u8 target[16];
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

static __noinline int drop(struct pkt *p, __u8 reason)
{
	count(p, 0, VERDICT_DROP, reason);

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
		bpf_ringbuf_submit(ev, 0);
	}
	return TC_ACT_SHOT;
}

static __noinline int pass(struct pkt *p, __u8 reason)
{
	count(p, 0, VERDICT_PASS, reason);
	return TC_ACT_OK;
}

/* Fill a socket lookup tuple from the packet, with dport replaced. */
static __always_inline __u32 make_tuple(struct bpf_sock_tuple *t, struct pkt *p, __u16 dport)
{
	if (p->family == 4) {
		__builtin_memcpy(&t->ipv4.saddr, p->saddr, 4);
		__builtin_memcpy(&t->ipv4.daddr, p->daddr, 4);
		t->ipv4.sport = bpf_htons(p->sport);
		t->ipv4.dport = bpf_htons(dport);
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, p->saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, p->daddr, 16);
	t->ipv6.sport = bpf_htons(p->sport);
	t->ipv6.dport = bpf_htons(dport);
	return sizeof(t->ipv6);
}

static __always_inline struct bpf_sock *lookup_sock(struct __sk_buff *skb, struct pkt *p, __u16 dport)
{
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, dport);
	if (p->proto == PROTO_TCP)
		return bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	return bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
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
			return drop(p, REASON_ASSIGN_FAILED);
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

/* The established flow's own socket, if a proxy owns it: an established
 * socket carrying our socket mark, or a request socket (handshake in
 * progress; it has no mark to check, but a request socket whose peer is the
 * sandbox exists only if one of our listeners took the sandbox's SYN: every
 * other SYN is dropped). The ACK completing a handshake must be assigned to
 * the request socket itself: assigned to the listener, the kernel would skip
 * the request lookup and answer with a reset. Listeners found here matched
 * a wildcard address by port number only, and time-wait sockets belong to
 * no proxy: both are ignored. */
static __always_inline struct bpf_sock *established_sock(struct __sk_buff *skb, struct pkt *p, struct config *cfg)
{
	struct bpf_sock_tuple t = {};
	__u32 len = make_tuple(&t, p, p->dport);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return NULL;
	if (sk->state == BPF_TCP_NEW_SYN_RECV)
		return sk;
	if (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT) {
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

/* The rule verdict for a new flow: from the verdict cache when this
 * sandbox's current rule epoch has seen the destination, else from the
 * LPM trie (the cost of which grows with the depth of the trie), cached.
 * Returns 0 only if the cache could not be consulted at all. */
static __always_inline int rule_verdict(struct pkt *p, struct sandbox *sb, struct cached_verdict *out)
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
		return 1;
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
	return 1;
}

static __always_inline int classify_l4(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, void *l4,
				       void *end)
{
	__u32 ck = 0;
	struct config *cfg = bpf_map_lookup_elem(&cw_config, &ck);
	if (!cfg)
		return drop(p, REASON_NO_PROXY);

	if (p->proto == PROTO_TCP) {
		struct tcp_hdr *th = l4;
		if ((void *)(th + 1) > end)
			return drop(p, REASON_MALFORMED);
		if ((th->doff_res >> 4) < 5)
			return drop(p, REASON_MALFORMED);
		p->sport = bpf_ntohs(th->sport);
		p->dport = bpf_ntohs(th->dport);
		p->new_flow = (th->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;

		struct bpf_sock *sk = established_sock(skb, p, cfg);
		if (sk)
			return redirect(skb, p, sb, cfg, sk, 0, default_listener(p), REASON_ESTABLISHED);
		if (!p->new_flow)
			return drop(p, REASON_NO_SOCKET);
	} else {
		struct udp_hdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return drop(p, REASON_MALFORMED);
		p->sport = bpf_ntohs(uh->sport);
		p->dport = bpf_ntohs(uh->dport);
		p->new_flow = 1;
	}
	if (p->sport == 0 || p->dport == 0)
		return drop(p, REASON_MALFORMED);

	__u32 rule_id = 0;
	__u8 listener = default_listener(p);
	__u8 reason = REASON_DNS;
	if (p->dport != 53) {
		struct cached_verdict v;
		if (!rule_verdict(p, sb, &v) || !v.rule_id)
			return drop(p, REASON_NO_RULE);
		if (v.expires_ns && bpf_ktime_get_ns() > v.expires_ns)
			return drop(p, REASON_EXPIRED);
		rule_id = v.rule_id;
		listener = v.listener;
		reason = REASON_RULE;
	}

	struct bpf_sock *sk = listener_sock(skb, p, cfg, listener);
	if (!sk)
		return drop(p, REASON_NO_PROXY);
	return redirect(skb, p, sb, cfg, sk, rule_id, listener, reason);
}

static __always_inline int handle_arp(struct pkt *p, struct sandbox *sb, struct eth_hdr *eth, void *end)
{
	struct arp_hdr *a = (void *)(eth + 1);
	if ((void *)(a + 1) > end)
		return drop(p, REASON_MALFORMED);
	if (!(sb->flags & SANDBOX_HAS_IPV4))
		return drop(p, REASON_ARP_NOT_GATEWAY);
	if (a->htype != bpf_htons(1) || a->ptype != bpf_htons(ETH_P_IPV4) || a->hlen != 6 || a->plen != 4)
		return drop(p, REASON_ARP_NOT_GATEWAY);
	if (a->op != bpf_htons(1) && a->op != bpf_htons(2))
		return drop(p, REASON_ARP_NOT_GATEWAY);
	__u8 bcast[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	if (!mac_eq(a->sha, sb->mac))
		return drop(p, REASON_SPOOFED_MAC);
	if (!addr4_eq(a->spa, sb->ipv4) && *(__u32 *)a->spa != 0)
		return drop(p, REASON_SPOOFED_IP);
	if (!addr4_eq(a->tpa, sb->gateway_ipv4))
		return drop(p, REASON_ARP_NOT_GATEWAY);
	if (!mac_eq(eth->dst, bcast) && !mac_eq(eth->dst, sb->gateway_mac))
		return drop(p, REASON_ARP_NOT_GATEWAY);
	return pass(p, REASON_ARP);
}

static __always_inline int handle_ipv4(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct eth_hdr *eth,
				       void *end)
{
	struct ipv4_hdr *ip = (void *)(eth + 1);
	p->family = 4;
	if ((void *)(ip + 1) > end)
		return drop(p, REASON_MALFORMED);
	__builtin_memcpy(p->saddr, ip->saddr, 4);
	__builtin_memcpy(p->daddr, ip->daddr, 4);
	p->proto = ip->proto;
	if ((ip->version_ihl >> 4) != 4 || (ip->version_ihl & 0xf) < 5)
		return drop(p, REASON_MALFORMED);
	if (bpf_ntohs(ip->tot_len) < sizeof(*ip) || bpf_ntohs(ip->tot_len) > skb->len - sizeof(*eth))
		return drop(p, REASON_MALFORMED);
	if (!(sb->flags & SANDBOX_HAS_IPV4) || !addr4_eq(p->saddr, sb->ipv4))
		return drop(p, REASON_SPOOFED_IP);
	if (!mac_eq(eth->dst, sb->gateway_mac))
		return drop(p, REASON_L2_NOT_GATEWAY);
	/* Fragments carry no (or only partial) ports: never redirect them. */
	if (ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET))
		return drop(p, REASON_FRAGMENT);
	if ((ip->version_ihl & 0xf) != 5)
		return drop(p, REASON_IP_OPTIONS);
	if (ip->proto == PROTO_TCP || ip->proto == PROTO_UDP)
		return classify_l4(skb, p, sb, ip + 1, end);
	if (ip->proto == PROTO_ICMP)
		return drop(p, REASON_ICMP);
	return drop(p, REASON_PROTOCOL);
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

static __always_inline int handle_ndp(struct pkt *p, struct sandbox *sb, struct ipv6_hdr *ip, void *end)
{
	struct nd_hdr *nd = (void *)(ip + 1);
	if ((void *)nd + 4 > end)
		return drop(p, REASON_MALFORMED);
	__u8 type = nd->type;
	if (type != ICMPV6_RS && type != ICMPV6_NS && type != ICMPV6_NA)
		return drop(p, REASON_ICMP);
	/* RFC 4861: ND messages have hop limit 255 and code 0. */
	if (ip->hop_limit != 255 || nd->code != 0)
		return drop(p, REASON_NDP_NOT_GATEWAY);

	int has6 = sb->flags & SANDBOX_HAS_IPV6;
	int src_any = addr6_is_zero(p->saddr);
	if (!src_any && !addr6_eq(p->saddr, sb->ipv6_link_local) && !(has6 && addr6_eq(p->saddr, sb->ipv6)))
		return drop(p, REASON_SPOOFED_IP);

	if (type == ICMPV6_RS) {
		__u8 all_routers[16] = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02};
		if (!addr6_eq(p->daddr, all_routers))
			return drop(p, REASON_NDP_NOT_GATEWAY);
		return pass(p, REASON_NDP);
	}
	if ((void *)(nd + 1) > end)
		return drop(p, REASON_MALFORMED);
	__u8 target[16];
	__builtin_memcpy(target, nd->target, 16);

	int target_gw = addr6_eq(target, sb->gateway_ipv6_link_local) || (has6 && addr6_eq(target, sb->gateway_ipv6));
	int target_self = addr6_eq(target, sb->ipv6_link_local) || (has6 && addr6_eq(target, sb->ipv6));
	if (type == ICMPV6_NS) {
		/* Resolve the gateway, or duplicate address detection of our own address. */
		if (!(target_gw || (src_any && target_self)))
			return drop(p, REASON_NDP_NOT_GATEWAY);
		if (!addr6_eq(p->daddr, target) && !is_solicited_node(p->daddr, target))
			return drop(p, REASON_NDP_NOT_GATEWAY);
		return pass(p, REASON_NDP);
	}
	/* Neighbour advertisement: only of our own address, to the gateway or all nodes. */
	__u8 all_nodes[16] = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01};
	if (!target_self || src_any)
		return drop(p, REASON_NDP_NOT_GATEWAY);
	if (!addr6_eq(p->daddr, sb->gateway_ipv6_link_local) && !(has6 && addr6_eq(p->daddr, sb->gateway_ipv6)) &&
	    !addr6_eq(p->daddr, all_nodes))
		return drop(p, REASON_NDP_NOT_GATEWAY);
	return pass(p, REASON_NDP);
}

static __always_inline int handle_ipv6(struct __sk_buff *skb, struct pkt *p, struct sandbox *sb, struct eth_hdr *eth,
				       void *end)
{
	struct ipv6_hdr *ip = (void *)(eth + 1);
	p->family = 6;
	if ((void *)(ip + 1) > end)
		return drop(p, REASON_MALFORMED);
	__builtin_memcpy(p->saddr, ip->saddr, 16);
	__builtin_memcpy(p->daddr, ip->daddr, 16);
	p->proto = ip->nexthdr;
	if ((bpf_ntohl(ip->vtc_flow) >> 28) != 6)
		return drop(p, REASON_MALFORMED);
	if (bpf_ntohs(ip->payload_len) > skb->len - sizeof(*eth) - sizeof(*ip))
		return drop(p, REASON_MALFORMED);

	if (ip->nexthdr == PROTO_ICMPV6)
		return handle_ndp(p, sb, ip, end);

	/* The sandbox's own link-local address, and the unspecified address
	 * during duplicate address detection, are not spoofs: its kernel sends
	 * MLD reports from them, behind a hop-by-hop header. Such packets drop
	 * for what they are. TCP and UDP must come from the global address. */
	int from_global = (sb->flags & SANDBOX_HAS_IPV6) && addr6_eq(p->saddr, sb->ipv6);
	if (!from_global && !addr6_eq(p->saddr, sb->ipv6_link_local) && !addr6_is_zero(p->saddr))
		return drop(p, REASON_SPOOFED_IP);
	if (is_ipv6_ext(ip->nexthdr))
		return drop(p, REASON_IPV6_EXT);
	if (ip->nexthdr != PROTO_TCP && ip->nexthdr != PROTO_UDP)
		return drop(p, REASON_PROTOCOL);
	if (!from_global)
		return drop(p, REASON_SPOOFED_IP);
	if (!mac_eq(eth->dst, sb->gateway_mac))
		return drop(p, REASON_L2_NOT_GATEWAY);
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
		return drop(&p, REASON_UNKNOWN_SANDBOX);
	p.sandbox_id = sb->sandbox_id;

	/* A VLAN tag held in skb metadata is a frame we do not classify. */
	if (skb->vlan_present)
		return drop(&p, REASON_ETHERTYPE);

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + PULL_LEN > end && skb->len > (__u32)(end - data)) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}

	struct eth_hdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(&p, REASON_MALFORMED);
	__builtin_memcpy(p.src_mac, eth->src, 6);
	p.ethertype = bpf_ntohs(eth->proto);
	if (!mac_eq(eth->src, sb->mac))
		return drop(&p, REASON_SPOOFED_MAC);

	switch (p.ethertype) {
	case ETH_P_ARP_:
		return handle_arp(&p, sb, eth, end);
	case ETH_P_IPV4:
		return handle_ipv4(skb, &p, sb, eth, end);
	case ETH_P_IPV6_:
		return handle_ipv6(skb, &p, sb, eth, end);
	}
	return drop(&p, REASON_ETHERTYPE);
}

/* Parse just enough of a packet the bridge port already classified to find
 * its socket again. Headers were validated by sandbox_egress. */
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

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + PULL_LEN > end && skb->len > (__u32)(end - data)) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	struct eth_hdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(&p, REASON_UNCLASSIFIED);
	p.ethertype = bpf_ntohs(eth->proto);
	void *l4;
	if (p.ethertype == ETH_P_IPV4) {
		struct ipv4_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(&p, REASON_UNCLASSIFIED);
		p.family = 4;
		p.proto = ip->proto;
		__builtin_memcpy(p.saddr, ip->saddr, 4);
		__builtin_memcpy(p.daddr, ip->daddr, 4);
		l4 = ip + 1;
	} else if (p.ethertype == ETH_P_IPV6_) {
		struct ipv6_hdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(&p, REASON_UNCLASSIFIED);
		p.family = 6;
		p.proto = ip->nexthdr;
		__builtin_memcpy(p.saddr, ip->saddr, 16);
		__builtin_memcpy(p.daddr, ip->daddr, 16);
		l4 = ip + 1;
	} else {
		return drop(&p, REASON_UNCLASSIFIED);
	}
	if (p.proto == PROTO_TCP) {
		struct tcp_hdr *th = l4;
		if ((void *)(th + 1) > end)
			return drop(&p, REASON_UNCLASSIFIED);
		p.sport = bpf_ntohs(th->sport);
		p.dport = bpf_ntohs(th->dport);
		p.new_flow = (th->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	} else if (p.proto == PROTO_UDP) {
		struct udp_hdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return drop(&p, REASON_UNCLASSIFIED);
		p.sport = bpf_ntohs(uh->sport);
		p.dport = bpf_ntohs(uh->dport);
		p.new_flow = 1;
	} else {
		return drop(&p, REASON_UNCLASSIFIED);
	}

	struct bpf_sock *sk = NULL;
	if (p.proto == PROTO_TCP)
		sk = established_sock(skb, &p, cfg);
	if (!sk && (p.new_flow || p.proto == PROTO_UDP))
		sk = listener_sock(skb, &p, cfg, listener);
	if (!sk)
		return drop(&p, REASON_UNCLASSIFIED);
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return drop(&p, REASON_ASSIGN_FAILED);
	return TC_ACT_OK;
}

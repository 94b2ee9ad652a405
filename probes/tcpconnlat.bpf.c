// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * CO-RE probes for the fentry and kprobe modes: the start is taken when
 * tcp_v4_connect/tcp_v6_connect is entered, the end when tcp_rcv_state_process sees the
 * socket still in SYN_SENT (the SYN-ACK or RST is being processed). Connects that end any
 * other way are forgotten by the sock:inet_sock_set_state hook.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int on_connect(struct sock *sk)
{
	const struct config *cfg = get_config();

	if (cfg)
		remember_connect(cfg, (__u64)sk, BPF_CORE_READ(sk, __sk_common.skc_family));
	return 0;
}

static __always_inline int on_rcv_state(void *ctx, struct sock *sk, int transport)
{
	const struct config *cfg;
	struct event e = {};

	if (BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_SYN_SENT)
		return 0;
	cfg = get_config();
	if (!cfg)
		return 0;
	e.af = BPF_CORE_READ(sk, __sk_common.skc_family);
	e.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	e.dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	/* The destination of each read is the whole 16-byte array, never its first byte. */
	if (e.af == AF_INET) {
		__u32 saddr = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		__builtin_memcpy(e.saddr, &saddr, sizeof(saddr));
		__builtin_memcpy(e.daddr, &daddr, sizeof(daddr));
	} else {
		BPF_CORE_READ_INTO(&e.saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&e.daddr, sk, __sk_common.skc_v6_daddr);
	}
	complete_connect(ctx, cfg, (__u64)sk, &e, transport);
	return 0;
}

SEC("fentry/tcp_v4_connect")
int BPF_PROG(fentry_v4_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("fentry/tcp_v6_connect")
int BPF_PROG(fentry_v6_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("fentry/tcp_rcv_state_process")
int BPF_PROG(fentry_rcv_state_rb, struct sock *sk)
{
	return on_rcv_state(ctx, sk, TRANSPORT_RINGBUF);
}

SEC("fentry/tcp_rcv_state_process")
int BPF_PROG(fentry_rcv_state_pb, struct sock *sk)
{
	return on_rcv_state(ctx, sk, TRANSPORT_PERFBUF);
}

/* Attached by name from kallsyms (tcp_v4_connect may be tcp_v4_connect.isra.0). */
SEC("kprobe")
int BPF_KPROBE(kprobe_v4_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("kprobe")
int BPF_KPROBE(kprobe_v6_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("kprobe")
int BPF_KPROBE(kprobe_rcv_state_rb, struct sock *sk)
{
	return on_rcv_state(ctx, sk, TRANSPORT_RINGBUF);
}

SEC("kprobe")
int BPF_KPROBE(kprobe_rcv_state_pb, struct sock *sk)
{
	return on_rcv_state(ctx, sk, TRANSPORT_PERFBUF);
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_forget(void *ctx)
{
	const struct config *cfg = get_config();
	struct state_change sc;

	if (cfg && !read_state_change(ctx, &cfg->tp, &sc))
		forget_if_done(&sc);
	return 0;
}

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * CO-RE probes for the fentry and kprobe modes. The clock starts when tcp_v4_connect /
 * tcp_v6_connect is entered (as bcc does), the answer is stamped when
 * tcp_rcv_state_process sees the socket still in SYN_SENT (the SYN-ACK or RST being
 * processed), and the sock:inet_sock_set_state state machine of common.bpf.h remembers the
 * connect when its socket moves to SYN_SENT and reports it when it leaves. A connect that
 * fails before SYN_SENT is never remembered: no exit probe is needed.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

struct config;
static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk)
{
	int err = BPF_CORE_READ((struct sock *)sk, sk_err);

	/* An ICMP error that came while the socket was locked is only "soft". */
	return err ? err : BPF_CORE_READ((struct sock *)sk, sk_err_soft);
}

#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("fentry/tcp_v4_connect")
int BPF_PROG(fentry_v4_connect, struct sock *sk)
{
	connect_entered((__u64)sk);
	return 0;
}

SEC("fentry/tcp_v6_connect")
int BPF_PROG(fentry_v6_connect, struct sock *sk)
{
	connect_entered((__u64)sk);
	return 0;
}

/* fentry's arguments are typed: the state is read directly, no helper call. */
SEC("fentry/tcp_rcv_state_process")
int BPF_PROG(fentry_rcv_state, struct sock *sk)
{
	if (sk->__sk_common.skc_state == TCP_SYN_SENT)
		mark_answer((__u64)sk);
	return 0;
}

/* kprobes are attached by name from kallsyms (tcp_v4_connect may be tcp_v4_connect.isra.0). */
SEC("kprobe")
int BPF_KPROBE(kprobe_v4_connect, struct sock *sk)
{
	connect_entered((__u64)sk);
	return 0;
}

SEC("kprobe")
int BPF_KPROBE(kprobe_v6_connect, struct sock *sk)
{
	connect_entered((__u64)sk);
	return 0;
}

SEC("kprobe")
int BPF_KPROBE(kprobe_rcv_state, struct sock *sk)
{
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_SYN_SENT)
		mark_answer((__u64)sk);
	return 0;
}

STATE_PROGRAMS()

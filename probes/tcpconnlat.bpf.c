// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * CO-RE probes for the fentry and kprobe modes. The clock starts when tcp_v4_connect /
 * tcp_v6_connect is entered (as bcc does), the answer is stamped when
 * tcp_rcv_state_process sees the socket still in SYN_SENT (the SYN-ACK or RST being
 * processed), and the sock:inet_sock_set_state state machine of common.bpf.h reports the
 * connect when the socket leaves SYN_SENT. A connect that fails before sending its SYN is
 * forgotten on the way out of the connect function.
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

static __always_inline int on_connect(struct sock *sk)
{
	const struct config *cfg = get_config();

	if (cfg)
		remember_connect(cfg, (__u64)sk, BPF_CORE_READ(sk, __sk_common.skc_family));
	return 0;
}

static __always_inline void on_connect_return(struct sock *sk, int ret)
{
	__u64 key = (__u64)sk;

	/* Failed before the SYN went out (no route, bad address): nothing will follow. */
	if (ret < 0 && BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_SYN_SENT)
		bpf_map_delete_elem(&pending, &key);
}

static __always_inline int on_rcv_state(struct sock *sk)
{
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_SYN_SENT)
		mark_answer((__u64)sk);
	return 0;
}

SEC("fentry/tcp_v4_connect")
int BPF_PROG(fentry_v4_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("fexit/tcp_v4_connect")
int BPF_PROG(fexit_v4_connect, struct sock *sk, struct sockaddr *uaddr, int addr_len, int ret)
{
	on_connect_return(sk, ret);
	return 0;
}

SEC("fentry/tcp_v6_connect")
int BPF_PROG(fentry_v6_connect, struct sock *sk)
{
	return on_connect(sk);
}

SEC("fexit/tcp_v6_connect")
int BPF_PROG(fexit_v6_connect, struct sock *sk, struct sockaddr *uaddr, int addr_len, int ret)
{
	on_connect_return(sk, ret);
	return 0;
}

SEC("fentry/tcp_rcv_state_process")
int BPF_PROG(fentry_rcv_state, struct sock *sk)
{
	return on_rcv_state(sk);
}

/* kprobes are attached by name from kallsyms (tcp_v4_connect may be tcp_v4_connect.isra.0). */
static __always_inline int on_kprobe_connect(struct sock *sk)
{
	connect_entered((__u64)sk);
	return on_connect(sk);
}

static __always_inline int on_kretprobe_connect(int ret)
{
	__u64 sk = connect_returning();

	if (sk)
		on_connect_return((struct sock *)sk, ret);
	return 0;
}

SEC("kprobe")
int BPF_KPROBE(kprobe_v4_connect, struct sock *sk)
{
	return on_kprobe_connect(sk);
}

SEC("kretprobe")
int BPF_KRETPROBE(kretprobe_v4_connect, int ret)
{
	return on_kretprobe_connect(ret);
}

SEC("kprobe")
int BPF_KPROBE(kprobe_v6_connect, struct sock *sk)
{
	return on_kprobe_connect(sk);
}

SEC("kretprobe")
int BPF_KRETPROBE(kretprobe_v6_connect, int ret)
{
	return on_kretprobe_connect(ret);
}

SEC("kprobe")
int BPF_KPROBE(kprobe_rcv_state, struct sock *sk)
{
	return on_rcv_state(sk);
}

STATE_PROGRAMS(0)

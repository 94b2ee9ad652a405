// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * CO-RE probes for the fentry and kprobe modes. The clock starts when tcp_v4_connect /
 * tcp_v6_connect is entered (as bcc does); the state machine of common.bpf.h, on the
 * sock:inet_sock_set_state raw tracepoint, remembers the connect when its socket moves to
 * SYN_SENT and reports it when the SYN-ACK moves it to ESTABLISHED (or an RST,
 * tcp:tcp_receive_reset, or its giving up moves it to CLOSE), as in tracepoint mode. bcc stamps the answer on entering
 * tcp_rcv_state_process instead: a probe there runs for every segment of every socket in a
 * handshake, five times a connect, for an instant earlier in handling the same segment.
 * A connect that fails before SYN_SENT is never remembered: no exit probe.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

struct config;
#define SOCK_BY_BTF
static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk)
{
	int err = BPF_CORE_READ((struct sock *)sk, sk_err);

	/* An ICMP error that came while the socket was locked is only "soft". */
	return err ? err : BPF_CORE_READ((struct sock *)sk, sk_err_soft);
}

#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Starts the clock of a connect: the same body on every hook of a connect function. */
#define CONNECT_PROGRAM(wrapper, name, section)                                        \
	SEC(section)                                                                    \
	int wrapper(name, struct sock *sk)                                              \
	{                                                                               \
		connect_entered((__u64)sk);                                             \
		return 0;                                                               \
	}

CONNECT_PROGRAM(BPF_PROG, fentry_v4_connect, "fentry/tcp_v4_connect")
CONNECT_PROGRAM(BPF_PROG, fentry_v6_connect, "fentry/tcp_v6_connect")
/* kprobes are attached by name from kallsyms (tcp_v4_connect may be tcp_v4_connect.isra.0). */
CONNECT_PROGRAM(BPF_KPROBE, kprobe_v4_connect, "kprobe")
CONNECT_PROGRAM(BPF_KPROBE, kprobe_v6_connect, "kprobe")

RAW_STATE_PROGRAMS()

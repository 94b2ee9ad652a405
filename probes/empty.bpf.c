// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The benchmark's floor: programs that do nothing, on the very hooks tcpconnlat uses, so
 * that the cost of the hooks themselves can be told from the cost of our probe logic.
 * Never part of tracing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tracepoint/sock/inet_sock_set_state")
int empty_state(void *ctx)
{
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int empty_raw_state(void *ctx)
{
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int empty_btf_state(void *ctx)
{
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int empty_retransmit(void *ctx)
{
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int empty_reset(void *ctx)
{
	return 0;
}

SEC("fentry/tcp_v4_connect")
int BPF_PROG(empty_fentry_v4_connect)
{
	return 0;
}

SEC("kprobe/tcp_v4_connect")
int empty_kprobe_v4_connect(void *ctx)
{
	return 0;
}

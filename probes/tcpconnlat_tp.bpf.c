// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Tracepoint mode: everything from sock:inet_sock_set_state, read by format-file offsets,
 * so this object has no CO-RE relocation and needs neither kprobes, fentry nor BTF.
 * CLOSE -> SYN_SENT happens in the connecting process (start, pid, comm);
 * SYN_SENT -> ESTABLISHED completes the connect with the record's addresses and ports.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int on_state(void *ctx, int transport)
{
	const struct config *cfg = get_config();
	const struct state_layout *l;
	struct state_change sc;
	struct event e = {};

	if (!cfg)
		return 0;
	l = &cfg->tp;
	if (read_state_change(ctx, l, &sc) || sc.protocol != IPPROTO_TCP)
		return 0;
	if (sc.oldstate == TCP_CLOSE && sc.newstate == TCP_SYN_SENT) {
		remember_connect(cfg, sc.skaddr, sc.family);
		return 0;
	}
	if (sc.oldstate != TCP_SYN_SENT || sc.newstate != TCP_ESTABLISHED) {
		forget_if_done(&sc);
		return 0;
	}
	e.af = sc.family;
	if (READ_TP_FIELD(e.lport, ctx, l->sport) || READ_TP_FIELD(e.dport, ctx, l->dport))
		return 0;
	if (e.af == AF_INET) {
		bpf_probe_read(e.saddr, 4, (char *)ctx + l->saddr);
		bpf_probe_read(e.daddr, 4, (char *)ctx + l->daddr);
	} else {
		bpf_probe_read(e.saddr, 16, (char *)ctx + l->saddr_v6);
		bpf_probe_read(e.daddr, 16, (char *)ctx + l->daddr_v6);
	}
	complete_connect(ctx, cfg, sc.skaddr, &e, transport);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_state_rb(void *ctx)
{
	return on_state(ctx, TRANSPORT_RINGBUF);
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_state_pb(void *ctx)
{
	return on_state(ctx, TRANSPORT_PERFBUF);
}

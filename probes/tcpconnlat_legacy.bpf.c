// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Legacy mode, for kernels without BTF, from Linux 4.4 on: kprobes only, no CO-RE
 * relocation, no global data, no ring buffer, and struct sock read at offsets userspace
 * passes in the config map (from BTF, kernel headers, or found at start-up), so one object
 * serves every kernel.
 *
 * tcp_set_state does most of the work, as the state tracepoint does in tracepoint mode:
 * CLOSE -> SYN_SENT (inside connect(), in the connecting process) starts the clock, and
 * leaving SYN_SENT finishes the connect. tcp_rcv_state_process stamps the answer,
 * tcp_retransmit_skb counts SYN retransmits and tcp_reset marks refusals. No kretprobe, so
 * no per-thread table to leak.
 *
 * What Linux 4.4 lacks, and how this object does without (a test inspects the ELF):
 * - no BTF: no vmlinux.h, whose structs would make every field access a CO-RE relocation;
 * - no global data (5.2): configuration through an array map;
 * - no LRU maps (4.10) and no ring buffer (5.8): plain hash maps, the perf buffer;
 * - no BPF_F_CURRENT_CPU (4.7): events go to the perf buffer of this CPU by number;
 * - bpf_probe_read writes only to initialised stack (4.7 relaxed it): every destination
 *   is a zeroed stack variable;
 * - no loops (5.3) and no BPF-to-BPF calls (4.16): everything inlined, bounded, unrolled;
 * - the BPF v1 instruction set only (build.rs pins -mcpu=v1: v2 jumps are 4.14+, v3 5.1+);
 * - kprobe programs must carry LINUX_VERSION_CODE (before 5.0): userspace stamps it.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define TCPCONNLAT_LEGACY
#include "legacy.bpf.h"

#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* tcp_set_state(sk, state), before the state changes. */
SEC("kprobe/tcp_set_state")
int legacy_set_state(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = PT_REGS_ARG1(ctx);
	int newstate = (int)PT_REGS_ARG2(ctx);
	struct peer to = {};
	struct event e = {};
	struct pending *p;
	__u8 state, kind;

	if (!cfg)
		return 0;
	state = sock_state(cfg, sk);
	if (newstate == TCP_SYN_SENT) {
		/* connect() on a closed socket: in the connecting process. */
		if (state == TCP_CLOSE) {
			read_sock_peer(cfg, sk, &to);
			remember_connect(ctx, cfg, sk, &to, TRANSPORT_PERFBUF);
		}
		return 0;
	}
	if (state != TCP_SYN_SENT)
		return 0;
	p = pending_connect(sk);
	if (!p)
		return 0;
	read_sock_peer(cfg, sk, &to);
	kind = finish_connect(ctx, cfg, sk, p, newstate, &to, &e, TRANSPORT_PERFBUF);
	if (!kind)
		return 0;
	read_sock_source(cfg, sk, &e);
	settle_connect(ctx, cfg, sk, p, &e, kind, TRANSPORT_PERFBUF);
	return 0;
}

/* The sweeper's question (Linux 5.10+; loaded only there). */
CONFIRM_PROGRAM(confirm_pb, TRANSPORT_PERFBUF)

SEC("kprobe/tcp_rcv_state_process")
int legacy_rcv_state(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = PT_REGS_ARG1(ctx);

	if (cfg && sock_state(cfg, sk) == TCP_SYN_SENT)
		mark_answer(sk);
	return 0;
}

SEC("kprobe/tcp_retransmit_skb")
int legacy_retransmit(struct pt_regs *ctx)
{
	count_retransmit(PT_REGS_ARG1(ctx));
	return 0;
}

SEC("kprobe/tcp_reset")
int legacy_reset(struct pt_regs *ctx)
{
	mark_reset(PT_REGS_ARG1(ctx));
	return 0;
}

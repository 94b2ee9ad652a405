// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Legacy mode, for kernels without BTF: kprobes only, no CO-RE relocation, no global data,
 * no ring buffer, only helpers old kernels have (bpf_probe_read, perf event output), and
 * struct sock read at offsets userspace passes in the config map (from a BTF file or from
 * kernel headers at build time), so one object serves every kernel.
 *
 * tcp_v4_connect / tcp_v6_connect start the clock (their return drops a connect that failed
 * before its SYN), tcp_rcv_state_process stamps the answer, tcp_set_state finishes the
 * connect as the state tracepoint does in the other modes, tcp_retransmit_skb counts SYN
 * retransmits and tcp_reset marks refusals.
 *
 * No vmlinux.h: its structs would make every field access a CO-RE relocation. The only
 * kernel type needed is x86-64's struct pt_regs, for the kprobe arguments.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define TCPCONNLAT_LEGACY
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7

/* arch/x86/include/asm/ptrace.h, the kernel's own layout. */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

struct config;
static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk);

#include "common.bpf.h"

static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk)
{
	int err = 0;

	READ_AT(err, sk, cfg->sk.err);
	if (!err)
		READ_AT(err, sk, cfg->sk.err_soft);
	return err;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline __u8 sock_state(const struct config *cfg, __u64 sk)
{
	__u8 state = 0;

	READ_AT(state, sk, cfg->sk.state);
	return state;
}

SEC("kprobe/tcp_v4_connect")
int legacy_connect(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = ctx->di;
	__u16 family = 0;

	if (!cfg)
		return 0;
	READ_AT(family, sk, cfg->sk.family);
	connect_entered(sk);
	remember_connect(cfg, sk, family);
	return 0;
}

SEC("kretprobe/tcp_v4_connect")
int legacy_connect_return(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = connect_returning();
	/* An int: the upper half of rax is not part of it (mov to eax zero-extends). */
	int ret = (int)ctx->ax;

	/* Failed before the SYN went out (no route, bad address): nothing will follow. */
	if (cfg && sk && ret < 0 && sock_state(cfg, sk) != TCP_SYN_SENT)
		bpf_map_delete_elem(&pending, &sk);
	return 0;
}

SEC("kprobe/tcp_rcv_state_process")
int legacy_rcv_state(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = ctx->di;

	if (cfg && sock_state(cfg, sk) == TCP_SYN_SENT)
		mark_answer(sk);
	return 0;
}

SEC("kprobe/tcp_set_state")
int legacy_set_state(struct pt_regs *ctx)
{
	const struct config *cfg = get_config();
	__u64 sk = ctx->di;
	int newstate = (int)ctx->si;
	struct event e = {};
	__u16 dport = 0;

	if (!cfg || newstate == TCP_SYN_SENT || sock_state(cfg, sk) != TCP_SYN_SENT)
		return 0;
	if (!finish_connect(cfg, sk, newstate, &e))
		return 0;
	READ_AT(e.af, sk, cfg->sk.family);
	READ_AT(e.lport, sk, cfg->sk.num);
	READ_AT(dport, sk, cfg->sk.dport);
	e.dport = __builtin_bswap16(dport);
	if (e.af == FAMILY_INET) {
		bpf_probe_read(e.saddr, 4, (char *)sk + cfg->sk.rcv_saddr);
		bpf_probe_read(e.daddr, 4, (char *)sk + cfg->sk.daddr);
	} else {
		bpf_probe_read(e.saddr, 16, (char *)sk + cfg->sk.v6_rcv_saddr);
		bpf_probe_read(e.daddr, 16, (char *)sk + cfg->sk.v6_daddr);
	}
	report(ctx, cfg, &e, TRANSPORT_PERFBUF);
	return 0;
}

SEC("kprobe/tcp_retransmit_skb")
int legacy_retransmit(struct pt_regs *ctx)
{
	count_retransmit(ctx->di);
	return 0;
}

SEC("kprobe/tcp_reset")
int legacy_reset(struct pt_regs *ctx)
{
	mark_reset(ctx->di);
	return 0;
}

/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What the objects that must load on Linux 4.4 without BTF (legacy mode, offset
 * discovery) share: the kprobe context as the kernel lays it out, and the TCP states they
 * compare against. They include the UAPI headers (linux/bpf.h), not vmlinux.h.
 */
#ifndef TCPCONNLAT_LEGACY_BPF_H
#define TCPCONNLAT_LEGACY_BPF_H

#if !defined(__TARGET_ARCH_x86) && !defined(__x86_64__)
/* pt_regs below is x86-64's; clang -target bpf defines neither, so build.rs passes
 * __TARGET_ARCH_x86 for x86-64 targets and fails on others. */
#error "the legacy probes know only x86-64's struct pt_regs"
#endif

/* arch/x86/include/asm/ptrace.h, the kernel's own layout (unchanged since 2.6). */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

/* The x86-64 calling convention: the first arguments in rdi, rsi. */
#define PT_REGS_ARG1(ctx) ((ctx)->di)
#define PT_REGS_ARG2(ctx) ((ctx)->si)

/* include/net/tcp_states.h */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7

#endif /* TCPCONNLAT_LEGACY_BPF_H */

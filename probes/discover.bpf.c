// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Offset discovery, for kernels whose struct sock layout neither BTF nor built-in headers
 * give: for sockets tcpconnlat connects itself, with addresses and ports it chose, copy
 * the start of struct sock when connect() moves it to SYN_SENT and again when it leaves
 * SYN_SENT. Userspace finds each field where its known value is (compat::discover).
 *
 * It loads where legacy mode does (Linux 4.4 on, no BTF) and keeps to the same limits
 * (see tcpconnlat_legacy.bpf.c): one kprobe, stack-only probe reads, no loops, v1 ISA.
 * It is loaded, used and closed before tracing starts.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "legacy.bpf.h"
#include "discover.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct discover_config);
} discover_config SEC(".maps");

/* Our sockets, from their SYN_SENT on: the phase whose snapshot comes next. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u32);
} discover_socks SEC(".maps");

/* Snapshot chunks: key phase * SNAPSHOT_CHUNKS + chunk. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PHASES * SNAPSHOT_CHUNKS);
	__type(key, __u32);
	__type(value, __u8[SNAPSHOT_CHUNK]);
} discover_snapshots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PHASES);
	__type(key, __u32);
	__type(value, struct discover_mark);
} discover_marks SEC(".maps");

/* One chunk through the stack into the map (no loop: unrolled by the caller's list). */
#define COPY_CHUNK(i)                                                                 \
	do {                                                                          \
		__u32 key = phase * SNAPSHOT_CHUNKS + (i);                            \
		bpf_probe_read(chunk, sizeof(chunk), (char *)sk + (i) * SNAPSHOT_CHUNK); \
		bpf_map_update_elem(&discover_snapshots, &key, chunk, BPF_ANY);       \
	} while (0)

static __always_inline void snapshot(__u64 sk, __u32 phase, int newstate)
{
	/* Zeroed once: before 4.7 a probe read's destination must be initialised stack. */
	__u8 chunk[SNAPSHOT_CHUNK] = {};
	struct discover_mark mark = { .taken = 1, .newstate = newstate };

	COPY_CHUNK(0);
	COPY_CHUNK(1);
	COPY_CHUNK(2);
	COPY_CHUNK(3);
	COPY_CHUNK(4);
	COPY_CHUNK(5);
	COPY_CHUNK(6);
	COPY_CHUNK(7);
	bpf_map_update_elem(&discover_marks, &phase, &mark, BPF_ANY);
}

static __always_inline int same_comm(const __u8 *a, const __u8 *b)
{
#pragma unroll
	for (int i = 0; i < TASK_COMM_LEN; i++) {
		if (a[i] != b[i])
			return 0;
		if (!a[i])
			break;
	}
	return 1;
}

SEC("kprobe/tcp_set_state")
int discover_set_state(struct pt_regs *ctx)
{
	__u64 sk = PT_REGS_ARG1(ctx);
	int newstate = (int)PT_REGS_ARG2(ctx);
	__u32 zero = 0;
	struct discover_config *cfg = bpf_map_lookup_elem(&discover_config, &zero);
	__u32 *next;

	if (!cfg)
		return 0;
	if (newstate == TCP_SYN_SENT) {
		/* Inside connect(): ours if the thread is. (The answer comes in softirq, where
		 * the task is whichever was interrupted: known by the socket then.) */
		__u32 leaving = PHASE_LEAVING;
		__u8 comm[TASK_COMM_LEN] = {};

		bpf_get_current_comm(comm, sizeof(comm));
		if (!same_comm(comm, cfg->comm))
			return 0;
		bpf_map_update_elem(&discover_socks, &sk, &leaving, BPF_ANY);
		snapshot(sk, PHASE_CONNECTING, newstate);
		return 0;
	}
	next = bpf_map_lookup_elem(&discover_socks, &sk);
	if (!next || *next != PHASE_LEAVING)
		return 0;
	/* Only the first state after SYN_SENT: later ones (closing) are not the answer. */
	*next = PHASES;
	snapshot(sk, PHASE_LEAVING, newstate);
	return 0;
}

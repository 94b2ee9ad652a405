/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What the offset discovery object (discover.bpf.c) and userspace share. Enums, not
 * macros, so that they reach BTF (types.bpf.c) and Rust.
 */
#ifndef TCPCONNLAT_DISCOVER_H
#define TCPCONNLAT_DISCOVER_H

#include "tcpconnlat.h" /* TASK_COMM_LEN */

/*
 * A snapshot is the start of struct sock, copied in chunks: the stack (where bpf_probe_read
 * may write before 4.7) holds 512 bytes. 2 KiB covers every field sock_fields.h lists on
 * every kernel seen (sk_err_soft at 548 on 6.1, 600 on 6.12), with room for debug options
 * that grow the locks before them.
 */
enum snapshot_size {
	SNAPSHOT_CHUNK = 256,
	SNAPSHOT_CHUNKS = 8,
};

/* When a snapshot of one of our sockets is taken: at tcp_set_state(sk, ...) entry. */
enum snapshot_phase {
	PHASE_CONNECTING, /* CLOSE -> SYN_SENT, inside our connect() */
	PHASE_LEAVING,    /* SYN_SENT -> ESTABLISHED or CLOSE: the answer arrived */
	PHASES,
};

/*
 * `discover_config` key 0: the name of the thread whose connects are ours. A name, not a
 * pid: in a PID namespace userspace cannot know the pid the kernel's helpers give.
 */
struct discover_config {
	__u8 comm[TASK_COMM_LEN];
};

/* `discover_marks` key phase: whether that snapshot was taken, and into which state. */
struct discover_mark {
	__u32 taken;
	__u32 newstate;
};

#endif /* TCPCONNLAT_DISCOVER_H */

/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of what crosses the kernel/user boundary. The probes include it
 * and the Rust side gets the same structs from the object's BTF (libbpf-cargo
 * generates them), so the two can never drift apart.
 */
#ifndef TCPCONNLAT_H
#define TCPCONNLAT_H

#define TASK_COMM_LEN 16

/* Which buffer an emitting program writes to; each emitter is built once per transport. */
#define TRANSPORT_RINGBUF 0
#define TRANSPORT_PERFBUF 1

/*
 * Where each field of the sock:inet_sock_set_state record lives, read by userspace
 * from the tracepoint's format file. The probes read the record through these offsets
 * instead of a compiled-in struct, so they need no BTF for it.
 */
struct state_layout {
	__u16 skaddr;
	__u16 oldstate;
	__u16 newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol; /* 0: the kernel's record has no protocol field (TCP only) */
	__u16 saddr;
	__u16 daddr;
	__u16 saddr_v6;
	__u16 daddr_v6;
	__u16 __pad;
};

/* Written by userspace into the `config` array map (key 0) before anything is attached. */
struct config {
	__u64 min_lat_ns;   /* report only connects at least this slow; 0 = all */
	__u64 wakeup_bytes; /* ring buffer: wake the reader once this much is queued */
	__u32 target_tgid;  /* 0 = every process */
	__u16 target_family; /* 0 = both, else AF_INET / AF_INET6 */
	__u16 __pad;
	struct state_layout tp;
};

/* One connect in flight, keyed by its struct sock address. */
struct pending {
	__u64 start_ns;
	__u32 tgid;
	__u32 __pad;
	__u8 comm[TASK_COMM_LEN];
};

/* One completed connect. Addresses are in network order; ports in host order. */
struct event {
	__u64 ts_ns;    /* bpf_ktime_get_ns() when the handshake answer was processed */
	__u64 delta_ns; /* SYN sent -> SYN-ACK (or RST) processed */
	__u32 tgid;
	__u16 af;
	__u16 lport;
	__u16 dport;
	__u16 __pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 comm[TASK_COMM_LEN];
};

#endif /* TCPCONNLAT_H */

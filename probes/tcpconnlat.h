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
 * The sock:inet_sock_set_state record as today's kernels lay it out (every kernel of our
 * matrix, 6.1 to 6.18). Where the tracepoint's format file says the kernel's record is
 * this one, the probes read it directly (free); elsewhere through bpf_probe_read at the
 * offsets below (some 25 ns a field, about twenty fields per connect).
 */
struct state_record {
	__u64 common;
	__u64 skaddr;
	__s32 oldstate;
	__s32 newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
};

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
	__u16 direct; /* 1: the record is a struct state_record, read directly */
};

/*
 * Where the fields of struct sock that the probes without CO-RE read live, from BTF or
 * from kernel headers at build time (0 = unknown, for fields a mode can do without).
 */
struct sock_layout {
	__u16 family;
	__u16 state;
	__u16 num;   /* local port, host order */
	__u16 dport; /* network order */
	__u16 rcv_saddr;
	__u16 daddr;
	__u16 v6_rcv_saddr;
	__u16 v6_daddr;
	__u16 err;
	__u16 err_soft; /* an ICMP error that came while the socket was locked */
};

/* The probes' `counters` array map. */
#define COUNTER_DROPPED 0   /* events the buffer had no room for */
#define COUNTER_UNTRACKED 1 /* connects not timed: the pending table was full */
#define COUNTERS 2

/* How a connect ended (event.outcome). */
#define OUTCOME_ESTABLISHED 0
#define OUTCOME_REFUSED 1     /* an RST answered the SYN */
#define OUTCOME_TIMEOUT 2     /* no answer: left SYN_SENT by timer or close */
#define OUTCOME_UNREACHABLE 3 /* an ICMP error: host or network unreachable */
#define OUTCOME_ERROR 4       /* another socket error (see event.error) */

/* config.report: which outcomes to emit. */
#define REPORT_ESTABLISHED 1
#define REPORT_FAILED 2

/* Written by userspace into the `config_map` array map (key 0) before anything is attached. */
struct config {
	__u64 min_lat_ns;   /* report only connects at least this slow; 0 = all */
	__u64 wakeup_bytes; /* ring buffer: wake the reader once this much is queued */
	__u64 cgroup_id;    /* only connects from this cgroup v2; 0 = any */
	__u32 uid;          /* only this user, when filter_uid */
	__u16 family;       /* only this address family; 0 = both */
	__u8 filter_uid;
	__u8 filter_pids;   /* only processes in the `pids` map */
	__u8 filter_dports; /* only destination ports in the `dports` map */
	__u8 filter_comm;   /* only processes whose comm is `comm` */
	__u8 report;        /* REPORT_* bits */
	__u8 __pad;
	/* Offset of skaddr in the tcp:tcp_retransmit_skb and tcp:tcp_receive_reset records. */
	__u16 retransmit_skaddr;
	__u16 reset_skaddr;
	__u8 comm[TASK_COMM_LEN];
	struct state_layout tp;
	struct sock_layout sk;
	__u16 __pad2[2];
};

/* One connect in flight, keyed by its struct sock address. */
struct pending {
	__u64 start_ns;
	__u64 answer_ns; /* when the SYN-ACK or RST was processed, where a probe sees it */
	__u32 tgid;
	__u32 uid;
	__u32 syn_retrans;
	__u8 reset; /* an RST arrived */
	__u8 __pad[3];
	__u8 comm[TASK_COMM_LEN];
};

/* One finished connect. Addresses are in network order; ports in host order. */
struct event {
	__u64 ts_ns;    /* bpf_ktime_get_ns() when it finished */
	__u64 delta_ns; /* SYN sent -> SYN-ACK or RST processed, or -> given up */
	__u32 tgid;
	__u32 uid;
	__u16 af;
	__u16 lport;
	__u16 dport;
	__u16 syn_retrans; /* SYNs sent again before the end */
	__u16 error;       /* the socket's errno at the end, 0 if none or unknown */
	__u8 outcome;      /* OUTCOME_* */
	__u8 __pad[5];
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 comm[TASK_COMM_LEN];
};

#endif /* TCPCONNLAT_H */

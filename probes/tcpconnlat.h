/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of what crosses the kernel/user boundary. The probes include it
 * and the Rust side gets the same structs from the object's BTF (libbpf-cargo
 * generates them), so the two can never drift apart.
 */
#ifndef TCPCONNLAT_H
#define TCPCONNLAT_H

#define TASK_COMM_LEN 16

/*
 * The constants below are enums, not macros, so that they reach BTF (types.bpf.c) and the
 * Rust side uses the generated values: no number is written twice.
 */

/* The address families of event.af and config.family (AF_INET, AF_INET6). */
enum address_family {
	FAMILY_INET = 2,
	FAMILY_INET6 = 10,
};

/* Sizes userspace allocates by. */
enum limits {
	COMM_LEN = TASK_COMM_LEN,
};

/* Which buffer an emitting program writes to; each emitter is built once per transport. */
enum transport {
	TRANSPORT_RINGBUF,
	TRANSPORT_PERFBUF,
};

/*
 * The sock:inet_sock_set_state record as kernels from 5.6 lay it out. Where the
 * tracepoint's format file says the kernel's record is this one, the `_direct` programs
 * read it directly (free); elsewhere the others read it field by field through
 * bpf_probe_read at the offsets below (a helper call each). They are separate programs because a tracepoint program may not even contain
 * a read past the end of the kernel's record (attaching fails with EACCES): 5.4's record,
 * with a one-byte protocol, ends at byte 71 of this struct's 72.
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
	__u16 protocol_size; /* 1 (a __u8 before Linux 5.6) or 2 */
	__u16 saddr;
	__u16 daddr;
	__u16 saddr_v6;
	__u16 daddr_v6;
};

/*
 * Where the fields of struct sock that the probes without CO-RE read live (sock_fields.h
 * lists them), from BTF or from kernel headers at build time (0 = unknown, for fields a
 * mode can do without).
 */
struct sock_layout {
#define SOCK_FIELD(name, member) __u16 name;
#include "sock_fields.h"
#undef SOCK_FIELD
};

/* The slots of the probes' `counters` array map. */
enum counter {
	COUNTER_DROPPED,   /* events the buffer had no room for, and nothing kept */
	/* Ends the buffer had no room for, kept in the pending table under a kept key for the
	 * sweeper to report (config.keep_unsent): not lost, though perf counts them so. */
	COUNTER_KEPT,
	/* Ends the sweeper's question found no room for either, and put back in the table to
	 * report at its next question: not lost, though perf counts each such try so. */
	COUNTER_RETRIED,
	COUNTER_UNTRACKED, /* connects not timed: the pending table was full or refused them */
	/*
	 * Pending-table updates and deletes the kernel refused for another reason than a full
	 * table: a bucket lock it would not wait for (from 5.11 a nested update fails with
	 * EBUSY, from 6.15 the resilient lock gives up with EDEADLK or ETIMEDOUT). A refused
	 * update is also untracked; a refused delete leaves the end to the sweeper.
	 */
	COUNTER_TABLE_ERRORS,
	COUNTERS,
};

/* How a connect ended (event.outcome). */
enum outcome {
	OUTCOME_ESTABLISHED,
	OUTCOME_REFUSED,     /* an RST answered the SYN */
	OUTCOME_TIMEOUT,     /* no answer: left SYN_SENT by timer or close */
	OUTCOME_UNREACHABLE, /* an ICMP error: host or network unreachable */
	OUTCOME_ERROR,       /* another socket error (see event.error) */
	OUTCOME_UNKNOWN,     /* its end was not seen and its socket is gone (event.end) */
};

/*
 * How a connect's end became known (event.end). A probe sees nearly every one; the kernel
 * runs no probe at all for some (it skips a tracing program that would nest in another,
 * and some kernels drop whole batches of timer work silently), so the sweeper asks about
 * every connect pending a while: its socket out of SYN_SENT means it ended unseen.
 */
enum end_kind {
	END_SEEN,     /* a probe saw the socket leave SYN_SENT: the latency is measured */
	END_INFERRED, /* the sweeper found the socket out of SYN_SENT: delta_ns bounds the latency */
	END_GONE,     /* the socket was closed or reused meanwhile: outcome unknown, delta_ns a bound */
};

/* What the sweeper's question (confirm_pending) answers about a pending table entry. */
enum answer {
	ANSWER_DONE,    /* the entry is gone: reported, or found gone */
	ANSWER_PENDING, /* its connect is still waiting (or the answer must wait) */
	ANSWER_NO_ROOM, /* it ended, but the buffer had no room: ask again once it is read */
};

/* config.report: which outcomes to emit (bits). */
enum report {
	REPORT_ESTABLISHED = 1,
	REPORT_FAILED = 2,
	REPORT_ANY = REPORT_ESTABLISHED | REPORT_FAILED,
};

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
	__u8 label_cgroup;  /* put the connecting process's cgroup id in each event */
	/* Offset of skaddr in the tcp:tcp_retransmit_skb and tcp:tcp_receive_reset records. */
	__u16 retransmit_skaddr;
	__u16 reset_skaddr;
	__u8 comm[TASK_COMM_LEN];
	struct state_layout tp;
	struct sock_layout sk;
	/* An end the buffer has no room for is kept in the pending table, for the sweeper's
	 * question to report: set where the sweeper can ask (see keep_end). */
	__u8 keep_unsent;
	/* Each perf sample the helper said it wrote is counted in `sent`, by CPU: where
	 * nothing keeps an end that does not fit and the helper may not say so (before 5.4),
	 * what was sent and never read is what was lost, even if no later sample comes to
	 * carry perf's own count. */
	__u8 count_sent;
	__u8 __pad2[2];
};

/* One connect in flight, keyed by its struct sock address. */
struct pending {
	__u64 start_ns;
	__u64 answer_ns; /* when the SYN-ACK or RST was processed, where a probe sees it */
	__u64 confirmed_ns; /* when the sweeper last found the socket still in SYN_SENT */
	__u32 tgid;
	__u32 uid;
	__u32 syn_retrans;
	__u8 reset; /* an RST arrived */
	/* Reported by a probe that could not remove the entry (the kernel refused the delete):
	 * the sweeper removes it without reporting it again. */
	__u8 reported;
	__u8 outcome; /* OUTCOME_*, under a kept key */
	__u8 __pad;
	__u8 comm[TASK_COMM_LEN];
	__u64 cgroup_id; /* where config.label_cgroup asks for it */
	/* Whom it connects to, set before SYN_SENT: tells its socket from a later one that
	 * took the same memory. dport in host order; an IPv4 daddr is the first 4 bytes. */
	__u16 family;
	__u16 dport;
	__u8 daddr[16];
	/* The source, as the sweeper found it while the connect was pending (the kernel
	 * releases the port once a connect fails), or as the probe read it at its end (under a
	 * kept key). */
	__u16 lport;
	__u8 saddr[16];
	__u16 error; /* under a kept key: the socket's errno at the end */
	__u8 __pad2[4];
	/* Under a kept key: when it ended, and its latency. */
	__u64 end_ns;
	__u64 delta_ns;
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
	__u8 end;          /* END_*: seen, or inferred by the sweeper */
	__u8 __pad[4];
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 comm[TASK_COMM_LEN];
	__u64 cgroup_id; /* the connecting process's cgroup v2, or 0 (see config.label_cgroup) */
	/* Where the end was inferred: the socket was still in SYN_SENT this long after the
	 * start (delta_ns is when it was found out of it). */
	__u64 delta_min_ns;
};

#endif /* TCPCONNLAT_H */

/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Maps and logic shared by every probe object: the pending-connect table, configuration
 * and filters, the emit path for both transports, and the sock:inet_sock_set_state state
 * machine that finishes every connect, read by the record offsets userspace found in the
 * tracepoint's format file. Nothing here uses CO-RE.
 *
 * The socket's error is read at the offsets userspace found (`sock_error` below); the
 * CO-RE object reads the socket by BTF instead: it defines SOCK_BY_BTF and its own
 *     static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk);
 * before including this file, and gets the state machine on the raw tracepoint, which
 * reads the socket itself (RAW_STATE_PROGRAMS).
 *
 * The legacy object defines TCPCONNLAT_LEGACY first: it gets no ring buffer, no LRU map, no
 * cgroup helper and no tracepoint programs, so it loads on kernels older than those.
 */
#ifndef TCPCONNLAT_COMMON_BPF_H
#define TCPCONNLAT_COMMON_BPF_H

#include "tcpconnlat.h"

#define IPPROTO_TCP 6
#define ECONNREFUSED 111
#define ETIMEDOUT 110
#define EHOSTUNREACH 113
#define ENETUNREACH 101
#define EHOSTDOWN 112
#define ENETDOWN 100
#define ENOENT 2
#define EEXIST 17
#define E2BIG 7
#define ECONNRESET 104
#define EPIPE 32

/* Userspace sizes `pending` (--max-pending) and `events_rb` before load: these are
 * placeholders. */
#define MAX_PENDING 1
#define RINGBUF_BYTES 4096
#define MAX_FILTER_KEYS 64

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config_map SEC(".maps");

/*
 * Not LRU: an LRU table would silently evict connects still in flight under a SYN flood.
 * Every entry leaves when its socket leaves SYN_SENT (which every socket does before it is
 * freed), so the table is bounded by connects in flight; a connect that finds it full is
 * counted (COUNTER_UNTRACKED) and reported, never lost silently.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PENDING);
	__type(key, __u64);
	__type(value, struct pending);
} pending SEC(".maps");

/* -p and --dport sets, used when config.filter_pids / filter_dports say so. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FILTER_KEYS);
	__type(key, __u32);
	__type(value, __u8);
} pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FILTER_KEYS);
	__type(key, __u16);
	__type(value, __u8);
} dports SEC(".maps");

/* What the probes could not do, by COUNTER_*, read by userspace as it drains. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Perf samples written, by CPU (config.count_sent); sized by userspace to the possible
 * CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sent SEC(".maps");

static __always_inline void count(__u32 counter)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &counter);

	if (n)
		__sync_fetch_and_add(n, 1);
}

/*
 * A value the compiler must keep as it is: where two offsets from the config are chosen
 * between, clang would otherwise choose between their addresses and load once, and Linux
 * 4.4's verifier refuses arithmetic on a map value pointer ("invalid mem access 'inv'").
 */
#define OPAQUE(x) asm volatile("" : "+r"(x))

/* Read a field at a runtime offset (from a format file, BTF or kernel headers). */
#define READ_AT(dst, base, off) bpf_probe_read(&(dst), sizeof(dst), (char *)(base) + (off))

#ifndef SOCK_BY_BTF
/*
 * The socket's sk_err, else its sk_err_soft (an ICMP error that came while the socket was
 * locked), at the offsets userspace found; an offset of 0 is one it could not have.
 */
static __always_inline __u16 sock_error(const struct config *cfg, __u64 sk)
{
	int err = 0;

	if (cfg->sk.err)
		READ_AT(err, sk, cfg->sk.err);
	if (!err && cfg->sk.err_soft)
		READ_AT(err, sk, cfg->sk.err_soft);
	return err;
}
#endif

/* Nanoseconds from `start` to `end`; 0 where `end` is not later (unset, or a clock read
 * before the start): a wrapped difference would read as centuries, or negative to bcc's
 * users on RHEL 7. */
static __always_inline __u64 since(__u64 start, __u64 end)
{
	return end > start ? end - start : 0;
}

#ifndef TCPCONNLAT_LEGACY
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
} events_rb SEC(".maps");
#endif

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events_pb SEC(".maps");

#ifndef TCPCONNLAT_LEGACY
/*
 * fentry and kprobe modes start the clock where bcc does, when the connect function is
 * entered (before the route lookup and the choice of a source port); the connect is
 * remembered when its socket moves to SYN_SENT, a few instructions later in the same
 * thread. A per-CPU slot carries the time between the two: cheaper than a table, and
 * nothing to clean up. A connect that failed before SYN_SENT leaves its slot to be
 * overwritten, and a thread that moved to another CPU in between finds no match: its clock
 * starts at SYN_SENT, as in tracepoint mode.
 */
struct connect_entry {
	__u64 tid;
	__u64 sk;
	__u64 start_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct connect_entry);
} connect_entries SEC(".maps");

static __always_inline void connect_entered(__u64 sk)
{
	__u32 zero = 0;
	struct connect_entry *e = bpf_map_lookup_elem(&connect_entries, &zero);

	if (e) {
		e->tid = bpf_get_current_pid_tgid();
		e->sk = sk;
		e->start_ns = bpf_ktime_get_ns();
	}
}

/* When the connect of `sk` by thread `tid` started: its entry where a probe saw it. */
static __always_inline __u64 connect_start(__u64 sk, __u64 tid)
{
	__u32 zero = 0;
	struct connect_entry *e = bpf_map_lookup_elem(&connect_entries, &zero);

	if (e && e->sk == sk && e->tid == tid)
		return e->start_ns;
	return bpf_ktime_get_ns();
}
#else
/* Legacy mode starts the clock at SYN_SENT. */
static __always_inline __u64 connect_start(__u64 sk, __u64 tid)
{
	return bpf_ktime_get_ns();
}
#endif

static __always_inline const struct config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config_map, &zero);
}

/* The filters that only the connecting process's context can answer. */
static __always_inline int wanted_here(const struct config *cfg, __u16 family, __u32 tgid,
				       __u32 uid, const __u8 *comm, __u64 cgroup_id)
{
	if (cfg->family && cfg->family != family)
		return 0;
	if (cfg->filter_pids && !bpf_map_lookup_elem(&pids, &tgid))
		return 0;
	if (cfg->filter_uid && cfg->uid != uid)
		return 0;
	if (cfg->cgroup_id && cfg->cgroup_id != cgroup_id)
		return 0;
	if (cfg->filter_comm) {
		/* Both names are NUL-padded to TASK_COMM_LEN (the helper copies into a zeroed
		 * buffer; userspace pads its own): equal as 16 bytes is equal as names, in two
		 * comparisons, not a branch per byte for the verifier to follow. */
		__u64 name[2], wanted[2];

		__builtin_memcpy(name, comm, sizeof(name));
		__builtin_memcpy(wanted, cfg->comm, sizeof(wanted));
		if (name[0] != wanted[0] || name[1] != wanted[1])
			return 0;
	}
	return 1;
}

/* Whom a connect is to, as the state change into SYN_SENT shows it (see struct pending). */
struct peer {
	__u16 family;
	__u16 dport; /* host order */
	__u8 daddr[16];
};

/*
 * The socket's own fields, at the offsets userspace passed (cfg->sk, sock_fields.h): what
 * legacy mode reads instead of a state tracepoint, and what the sweeper's question reads in
 * every mode. Addresses are read 16 bytes at a time whatever the family: before 4.14 the
 * verifier wants each probe read's size a constant, and the compiler merges two reads of
 * different sizes into one whose size is a register. An IPv4 address is the first 4 bytes;
 * what was read after it is cleared.
 */
static __always_inline __u8 sock_state(const struct config *cfg, __u64 sk)
{
	__u8 state = 0;

	READ_AT(state, sk, cfg->sk.state);
	return state;
}

static __always_inline void read_sock_peer(const struct config *cfg, __u64 sk, struct peer *to)
{
	__u16 daddr = cfg->sk.v6_daddr;
	__u16 daddr4 = cfg->sk.daddr;
	__u16 dport = 0;

	OPAQUE(daddr);
	OPAQUE(daddr4);
	READ_AT(to->family, sk, cfg->sk.family);
	READ_AT(dport, sk, cfg->sk.dport);
	to->dport = __builtin_bswap16(dport);
	if (to->family == FAMILY_INET)
		daddr = daddr4;
	bpf_probe_read(to->daddr, sizeof(to->daddr), (char *)sk + daddr);
	if (to->family == FAMILY_INET)
		__builtin_memset(to->daddr + 4, 0, sizeof(to->daddr) - 4);
}

static __always_inline int same_address(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, sizeof(x));
	__builtin_memcpy(y, b, sizeof(y));
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Whether the connect an event describes is to `to`. Compared on the stack: compared in
 * the map value, the address is read through a pointer into it, which verifiers before
 * 4.14 refuse. */
static __always_inline int same_peer(const struct event *e, const struct peer *to)
{
	return e->af == to->family && e->dport == to->dport && same_address(e->daddr, to->daddr);
}

/* The source, into an event whose af is set. */
static __always_inline void read_sock_source(const struct config *cfg, __u64 sk, struct event *e)
{
	__u16 saddr = cfg->sk.v6_rcv_saddr;
	__u16 saddr4 = cfg->sk.rcv_saddr;

	OPAQUE(saddr);
	OPAQUE(saddr4);
	if (e->af == FAMILY_INET)
		saddr = saddr4;
	READ_AT(e->lport, sk, cfg->sk.num);
	bpf_probe_read(e->saddr, sizeof(e->saddr), (char *)sk + saddr);
	if (e->af == FAMILY_INET)
		__builtin_memset(e->saddr + 4, 0, sizeof(e->saddr) - 4);
}

/* What became of an event handed to report(). */
enum emitted {
	EMIT_SENT,
	EMIT_UNWANTED, /* the filters did not want it */
	EMIT_NO_ROOM,  /* the event buffer was full */
};

static __always_inline enum emitted submit(void *ctx, const struct config *cfg,
					   struct event *e, int transport);
static __always_inline enum emitted report(void *ctx, const struct config *cfg,
					   struct event *e, __u8 kind, int transport);

/* What a pending entry says of its connect, into an event: all but the end (and the source
 * only as far as the sweeper found it). */
static __always_inline void describe_connect(const struct pending *p, struct event *e)
{
	e->tgid = p->tgid;
	e->lport = p->lport;
	e->uid = p->uid;
	e->syn_retrans = p->syn_retrans;
	e->cgroup_id = p->cgroup_id;
	e->af = p->family;
	e->dport = p->dport;
	__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	__builtin_memcpy(e->daddr, p->daddr, sizeof(e->daddr));
	__builtin_memcpy(e->saddr, p->saddr, sizeof(e->saddr));
}

/*
 * An end the event buffer had no room for is kept in the pending table, where the sweeper
 * lists keys, under a key no socket has: its end time, odd, in the lower half of the
 * address space (struct sock is aligned, and in the kernel's upper half on every 64-bit
 * architecture). Its socket's own key is free at once for the socket's next connect.
 */
#define KEPT_KEY_MASK 0x7ffffffffffffffeULL

static __always_inline int is_kept_key(__u64 key)
{
	return (key & 1) && !(key >> 63);
}

/* A kept entry's end, into an event. */
static __always_inline void describe_kept_end(const struct pending *p, struct event *e)
{
	describe_connect(p, e);
	e->ts_ns = p->end_ns;
	e->delta_ns = p->delta_ns;
	e->error = p->error;
	e->outcome = p->outcome;
	e->end = END_SEEN;
}

/* Keep the end `e` of connect `p` (its entry, as it was) for the sweeper's question to
 * report, where there is a sweeper to ask; else it is lost, and counted. */
static __always_inline void keep_end(const struct config *cfg, const struct pending *p,
				     const struct event *e)
{
	struct pending kept;
	__u64 key = (e->ts_ns & KEPT_KEY_MASK) | 1;

	if (!cfg->keep_unsent) {
		count(COUNTER_DROPPED);
		return;
	}
	__builtin_memcpy(&kept, p, sizeof(kept));
	kept.end_ns = e->ts_ns;
	kept.delta_ns = e->delta_ns;
	kept.error = e->error;
	kept.outcome = e->outcome;
	kept.lport = e->lport;
	__builtin_memcpy(kept.saddr, e->saddr, sizeof(kept.saddr));
	/* Two ends kept in the same nanosecond on two CPUs: the next odd key. */
	if (bpf_map_update_elem(&pending, &key, &kept, BPF_NOEXIST)) {
		key += 2;
		if (bpf_map_update_elem(&pending, &key, &kept, BPF_NOEXIST)) {
			count(COUNTER_DROPPED);
			return;
		}
	}
	count(COUNTER_KEPT);
}

/*
 * A connect is starting on a socket whose previous connect is still in the table: no probe
 * saw that one end (or it ended while the kernel refused to remove its entry, and was
 * reported then). Report it now, before the new one takes its place: its socket went on
 * to connect again (or its memory became another socket's), so all that is known is that
 * it ended by now. Whoever removes an entry reports it: the sweeper may be asking about
 * it at this moment.
 */
static __always_inline void report_superseded(void *ctx, const struct config *cfg, __u64 sk,
					      int transport)
{
	struct pending *old = bpf_map_lookup_elem(&pending, &sk);
	struct event e = {};

	if (!old || old->reported)
		return;
	describe_connect(old, &e);
	e.ts_ns = bpf_ktime_get_ns();
	e.delta_ns = since(old->start_ns, e.ts_ns);
	e.delta_min_ns = since(old->start_ns, old->confirmed_ns);
	e.outcome = OUTCOME_UNKNOWN;
	e.end = END_GONE;
	/* ENOENT: the sweeper removed it, and reports it. Refused otherwise, it is replaced
	 * all the same. */
	if (bpf_map_delete_elem(&pending, &sk) == -ENOENT)
		return;
	if (report(ctx, cfg, &e, REPORT_ANY, transport) == EMIT_NO_ROOM)
		count(COUNTER_DROPPED);
}

/* Remember a connect about to send its SYN (its socket is moving to SYN_SENT, in the
 * connecting thread), if the filters want it. */
static __always_inline void remember_connect(void *ctx, const struct config *cfg, __u64 sk,
					     const struct peer *to, int transport)
{
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u64 tid = bpf_get_current_pid_tgid();
	struct pending p = {};
	long err;

	p.tgid = tid >> 32;
	p.uid = (__u32)uid_gid;
	bpf_get_current_comm(&p.comm, sizeof(p.comm));
#ifndef TCPCONNLAT_LEGACY
	/* The helper is Linux 4.18+: legacy mode does without (no --cgroup, no cgroup label). */
	if (cfg->cgroup_id || cfg->label_cgroup)
		p.cgroup_id = bpf_get_current_cgroup_id();
#endif
	if (!wanted_here(cfg, to->family, p.tgid, p.uid, p.comm, p.cgroup_id))
		return;
	p.start_ns = connect_start(sk, tid);
	p.family = to->family;
	p.dport = to->dport;
	__builtin_memcpy(p.daddr, to->daddr, sizeof(p.daddr));
	err = bpf_map_update_elem(&pending, &sk, &p, BPF_NOEXIST);
	if (err == -EEXIST) {
		report_superseded(ctx, cfg, sk, transport);
		err = bpf_map_update_elem(&pending, &sk, &p, BPF_ANY);
	}
	if (err) {
		count(COUNTER_UNTRACKED);
		if (err != -E2BIG)
			count(COUNTER_TABLE_ERRORS);
	}
}

/*
 * Emit one event. The ring buffer does not wake the reader for each event (wakeups are
 * what tracing costs, not the probe): userspace drains it on a short timer, and the
 * probe forces a wakeup only once enough has queued up that waiting could overflow it.
 */
static __always_inline enum emitted submit(void *ctx, const struct config *cfg,
					   struct event *e, int transport)
{
#ifndef TCPCONNLAT_LEGACY
	if (transport == TRANSPORT_RINGBUF) {
		__u64 flags = BPF_RB_NO_WAKEUP;

		if (bpf_ringbuf_query(&events_rb, BPF_RB_AVAIL_DATA) >= cfg->wakeup_bytes)
			flags = BPF_RB_FORCE_WAKEUP;
		return bpf_ringbuf_output(&events_rb, e, sizeof(*e), flags) ? EMIT_NO_ROOM :
									       EMIT_SENT;
	}
#endif
#ifdef TCPCONNLAT_LEGACY
	/* Before 4.7 the index is a CPU number only: BPF_F_CURRENT_CPU would be E2BIG. */
	__u64 cpu = bpf_get_smp_processor_id();
#else
	__u64 cpu = BPF_F_CURRENT_CPU;
#endif
	__u32 this_cpu;
	__u64 *n;

	/* The helper says it had no room from 5.4 on; before, it always returns 0, and only
	 * perf's own count of lost samples tells, or the count of samples sent. */
	if (bpf_perf_event_output(ctx, &events_pb, cpu, e, sizeof(*e)))
		return EMIT_NO_ROOM;
	if (cfg->count_sent) {
		this_cpu = bpf_get_smp_processor_id();
		n = bpf_map_lookup_elem(&sent, &this_cpu);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	return EMIT_SENT;
}

/* How a program reads the sock:inet_sock_set_state record: at the offsets of the kernel's
 * format file, or directly where it is laid out as struct state_record; or, on the raw
 * tracepoint, which builds no record, its arguments (socket, old and new state) and the
 * socket's fields by BTF, through the helper or (BTF-typed) as plain loads. */
enum record_read {
	READ_RECORD_AT_OFFSETS,
	READ_RECORD_DIRECT,
	READ_RAW_SOCKET,
	READ_BTF_SOCKET,
};

static __always_inline int reads_socket(enum record_read read)
{
	return read == READ_RAW_SOCKET || read == READ_BTF_SOCKET;
}

/* The fields of one sock:inet_sock_set_state record that decide what to do. */
struct state_change {
	__u64 skaddr;
	int oldstate;
	int newstate;
	__u16 family;
	__u16 protocol;
};

#ifdef SOCK_BY_BTF
/*
 * The raw tracepoints' reads, by BTF: what the record would have said, from the socket.
 * A field of `sk` is a load where the verifier knows the pointer's type (the BTF-typed
 * raw tracepoint), else a helper call.
 */
#define SOCK_READ(read, sk, field) ((read) == READ_BTF_SOCKET ? (sk)->field : BPF_CORE_READ(sk, field))
#define SOCK_COPY(read, dst, sk, field)                                                 \
	do {                                                                            \
		if ((read) == READ_BTF_SOCKET)                                          \
			__builtin_memcpy(dst, &(sk)->field, sizeof((sk)->field));       \
		else                                                                    \
			bpf_core_read(dst, sizeof((sk)->field), &(sk)->field);          \
	} while (0)

/*
 * The protocol is read only where a connect would be remembered: MPTCP's own socket moves
 * to SYN_SENT too, and only TCP sockets get entries (sk_protocol is a bitfield before
 * Linux 5.6, hence the probed read).
 */
static __always_inline void read_socket_change(struct state_change *sc, enum record_read read)
{
	const struct sock *sk = (const struct sock *)sc->skaddr;

	sc->family = SOCK_READ(read, sk, __sk_common.skc_family);
	sc->protocol = sc->newstate == TCP_SYN_SENT ? BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) :
						      IPPROTO_TCP;
}

/* Whom the socket connects to (to->family is set; the address is zeroed past IPv4's). */
static __always_inline void read_socket_peer(__u64 skaddr, struct peer *to, enum record_read read)
{
	const struct sock *sk = (const struct sock *)skaddr;

	to->dport = __builtin_bswap16(SOCK_READ(read, sk, __sk_common.skc_dport));
	/* IPv6 first: see read_peer. */
	if (to->family != FAMILY_INET) {
		if (bpf_core_field_exists(sk->__sk_common.skc_v6_daddr))
			SOCK_COPY(read, to->daddr, sk, __sk_common.skc_v6_daddr);
	} else {
		SOCK_COPY(read, to->daddr, sk, __sk_common.skc_daddr);
	}
}

/* The socket's source, into an event whose af is set. */
static __always_inline void read_socket_source(__u64 skaddr, struct event *e, enum record_read read)
{
	const struct inet_sock *inet = (const struct inet_sock *)skaddr;
	const struct sock *sk = (const struct sock *)skaddr;

	/* inet_sport, as the tracepoint reads it: a socket moving to CLOSE has released its
	 * port (inet_num is 0) by then. Through the helper: struct sock is all the verifier
	 * lets the BTF-typed program load from. */
	e->lport = __builtin_bswap16(BPF_CORE_READ(inet, inet_sport));
	if (e->af == FAMILY_INET)
		SOCK_COPY(read, e->saddr, sk, __sk_common.skc_rcv_saddr);
	else if (bpf_core_field_exists(sk->__sk_common.skc_v6_rcv_saddr))
		SOCK_COPY(read, e->saddr, sk, __sk_common.skc_v6_rcv_saddr);
}
#endif

/*
 * Read what decides; -1 if unreadable or if it is no transition into or out of SYN_SENT
 * (most state changes: those cost two reads only).
 */
static __always_inline int read_state_change(void *ctx, const struct state_layout *l,
					     enum record_read read, struct state_change *sc)
{
	struct {
		int oldstate;
		int newstate;
	} pair;

#ifdef SOCK_BY_BTF
	if (reads_socket(read)) {
		const __u64 *args = ctx;

		sc->oldstate = args[1];
		sc->newstate = args[2];
		if (sc->oldstate != TCP_SYN_SENT && sc->newstate != TCP_SYN_SENT)
			return -1;
		sc->skaddr = args[0];
		read_socket_change(sc, read);
		return 0;
	}
#endif
	if (read == READ_RECORD_DIRECT) {
		const struct state_record *r = ctx;

		sc->oldstate = r->oldstate;
		sc->newstate = r->newstate;
		if (sc->oldstate != TCP_SYN_SENT && sc->newstate != TCP_SYN_SENT)
			return -1;
		sc->skaddr = r->skaddr;
		sc->family = r->family;
		sc->protocol = r->protocol;
		return 0;
	}
	/* Every kernel so far puts newstate right after oldstate: one read, not two, on
	 * each of the state changes most connects go through. */
	if (l->newstate == l->oldstate + sizeof(int)) {
		if (READ_AT(pair, ctx, l->oldstate))
			return -1;
		sc->oldstate = pair.oldstate;
		sc->newstate = pair.newstate;
	} else if (READ_AT(sc->oldstate, ctx, l->oldstate) ||
		   READ_AT(sc->newstate, ctx, l->newstate)) {
		return -1;
	}
	if (sc->oldstate != TCP_SYN_SENT && sc->newstate != TCP_SYN_SENT)
		return -1;
	if (READ_AT(sc->skaddr, ctx, l->skaddr) || READ_AT(sc->family, ctx, l->family))
		return -1;
	sc->protocol = IPPROTO_TCP;
	if (l->protocol && l->protocol_size == 1) {
		__u8 protocol;

		if (READ_AT(protocol, ctx, l->protocol))
			return -1;
		sc->protocol = protocol;
	} else if (l->protocol && READ_AT(sc->protocol, ctx, l->protocol)) {
		return -1;
	}
	return 0;
}

/* Whom the connect is to, from the record of its move into SYN_SENT (family is set). */
static __always_inline void read_peer(void *ctx, const struct state_layout *l,
					      enum record_read read,
				      struct peer *to, __u64 sk)
{
#ifdef SOCK_BY_BTF
	if (reads_socket(read)) {
		read_socket_peer(sk, to, read);
		return;
	}
#endif
	if (read == READ_RECORD_DIRECT) {
		const struct state_record *r = ctx;
		__u64 half[2];
		__u32 v4;

		/* Loaded into registers here: compared in place, the two addresses would be
		 * read through one pointer chosen between them, which the verifier refuses
		 * for a context pointer. */
		to->dport = r->dport;
		/* IPv6 first, here and below: written so, it is the path the verifier
		 * follows first, and the stack it leaves (sixteen unknown bytes) covers
		 * IPv4's (four, then zeros), whose path it then prunes; the other way
		 * round, neither covers the other and much of what follows is verified
		 * twice. */
		if (to->family != FAMILY_INET) {
			__builtin_memcpy(half, r->daddr_v6, sizeof(half));
			OPAQUE(half[0]);
			OPAQUE(half[1]);
			__builtin_memcpy(to->daddr, half, sizeof(half));
		} else {
			__builtin_memcpy(&v4, r->daddr, sizeof(v4));
			OPAQUE(v4);
			__builtin_memcpy(to->daddr, &v4, sizeof(v4));
		}
		return;
	}
	READ_AT(to->dport, ctx, l->dport);
	if (to->family != FAMILY_INET)
		bpf_probe_read(to->daddr, 16, (char *)ctx + l->daddr_v6);
	else
		bpf_probe_read(to->daddr, 4, (char *)ctx + l->daddr);
}

/* The source, from the record of its move out of SYN_SENT (e->af is set). */
static __always_inline void read_source(void *ctx, const struct state_layout *l,
					      enum record_read read,
					struct event *e, __u64 sk)
{
#ifdef SOCK_BY_BTF
	if (reads_socket(read)) {
		read_socket_source(sk, e, read);
		return;
	}
#endif
	if (read == READ_RECORD_DIRECT) {
		const struct state_record *r = ctx;

		e->lport = r->sport;
		if (e->af == FAMILY_INET)
			__builtin_memcpy(e->saddr, r->saddr, 4);
		else
			__builtin_memcpy(e->saddr, r->saddr_v6, 16);
		return;
	}
	READ_AT(e->lport, ctx, l->sport);
	if (e->af == FAMILY_INET)
		bpf_probe_read(e->saddr, 4, (char *)ctx + l->saddr);
	else
		bpf_probe_read(e->saddr, 16, (char *)ctx + l->saddr_v6);
}

static __always_inline __u8 outcome_of(const struct pending *p, __u16 error)
{
	if (p->reset || error == ECONNREFUSED)
		return OUTCOME_REFUSED;
	if (error == EHOSTUNREACH || error == ENETUNREACH || error == EHOSTDOWN || error == ENETDOWN)
		return OUTCOME_UNREACHABLE;
	if (error && error != ETIMEDOUT)
		return OUTCOME_ERROR;
	return OUTCOME_TIMEOUT;
}

/*
 * How a connect ended whose socket the sweeper found closed: the sweeper looks every
 * second, so it ended within the second. Its error tells: a reset once established
 * (ECONNRESET, EPIPE) means it had succeeded; the errors of a failed connect say how.
 * No error left is a connect that succeeded and closed cleanly within the second, or one
 * whose error the application already took (a blocking connect() returns it, clearing
 * it): unknown.
 */
static __always_inline __u8 closed_outcome(const struct pending *p, __u16 error)
{
	if (error == ECONNRESET || error == EPIPE)
		return OUTCOME_ESTABLISHED;
	if (!error)
		return OUTCOME_UNKNOWN;
	return outcome_of(p, error);
}

/* The connect pending on socket `sk` and not yet reported, if any: what a socket leaving
 * SYN_SENT looks for. */
static __always_inline struct pending *pending_connect(__u64 sk)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &sk);

	return p && !p->reported ? p : NULL;
}

/*
 * Every connect ends here, in every mode, when its socket (connecting to `to`) leaves
 * SYN_SENT for `newstate`: `p` is its pending_connect(). To ESTABLISHED it succeeded;
 * anywhere else (CLOSE) it failed, and sk_err says why. Fills *e but for the source;
 * returns the end's REPORT_* kind for settle_connect once the source is read, or 0 if
 * there is nothing to settle.
 */
static __always_inline __u8 finish_connect(void *ctx, const struct config *cfg, __u64 sk,
					  const struct pending *p, int newstate,
					  const struct peer *to, struct event *e, int transport)
{
	describe_connect(p, e);
	if (!same_peer(e, to)) {
		/* An entry whose end no probe saw, its socket freed and taken since by a
		 * connect the filters do not want (which leaves no entry): that one is not
		 * ours, and the entry's connect ended by now. */
		report_superseded(ctx, cfg, sk, transport);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	if (newstate == TCP_ESTABLISHED) {
		e->outcome = OUTCOME_ESTABLISHED;
		e->delta_ns = since(p->start_ns, p->answer_ns ? p->answer_ns : e->ts_ns);
		return REPORT_ESTABLISHED;
	}
	e->error = sock_error(cfg, sk);
	e->outcome = outcome_of(p, e->error);
	/* An RST is an answer: its latency ends when it was processed. */
	e->delta_ns = since(p->start_ns, (p->reset && p->answer_ns) ? p->answer_ns : e->ts_ns);
	return REPORT_FAILED;
}

/*
 * Report a connect a probe saw end, then remove its entry. Until the state change that
 * runs this probe is stored, the sweeper's question finds the socket still in SYN_SENT
 * and leaves the entry alone, so reporting first cannot report it twice; and where the
 * buffer has no room, the entry is still there to keep the end with.
 */
static __always_inline void settle_connect(void *ctx, const struct config *cfg, __u64 sk,
					   struct pending *p, struct event *e, __u8 kind,
					   int transport)
{
	long err;

	if (report(ctx, cfg, e, kind, transport) == EMIT_NO_ROOM)
		keep_end(cfg, p, e);
	err = bpf_map_delete_elem(&pending, &sk);
	if (err && err != -ENOENT) {
		/* The kernel would not take the bucket's lock here (this probe runs nested in
		 * another table operation on this CPU): have the sweeper remove the entry
		 * without reporting it again. */
		p->reported = 1;
		count(COUNTER_TABLE_ERRORS);
	}
}

/*
 * The REPORT_* kind of an outcome: an unknown one (an end inferred, its socket gone) could
 * be either, and is shown unless none is wanted. Where the outcome is one of several
 * constants, the caller passes the kind it knows instead: the verifier, seeing the
 * outcome tested, would otherwise follow each constant down its own path.
 */
static __always_inline __u8 report_kind(__u8 outcome)
{
	if (outcome == OUTCOME_UNKNOWN)
		return REPORT_ANY;
	return outcome == OUTCOME_ESTABLISHED ? REPORT_ESTABLISHED : REPORT_FAILED;
}

/* The filters (`kind` is the end's REPORT_* kind), the last of which needs the endpoints:
 * then out it goes. */
static __always_inline enum emitted report(void *ctx, const struct config *cfg,
					   struct event *e, __u8 kind, int transport)
{
	if (!(cfg->report & kind))
		return EMIT_UNWANTED;
	if (e->delta_ns < cfg->min_lat_ns)
		return EMIT_UNWANTED;
	if (cfg->filter_dports && !bpf_map_lookup_elem(&dports, &e->dport))
		return EMIT_UNWANTED;
	return submit(ctx, cfg, e, transport);
}

/* Count a SYN sent again for a pending connect. */
static __always_inline void count_retransmit(__u64 sk)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &sk);

	/* Retransmits of one socket are serialised by its lock: no atomic needed. */
	if (p)
		p->syn_retrans++;
}

/* The SYN-ACK (or RST) of a pending connect is being processed (legacy mode, which has no
 * state tracepoint to end it): its latency ends here. */
static __always_inline void mark_answer(__u64 sk)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &sk);

	if (p && !p->answer_ns)
		p->answer_ns = bpf_ktime_get_ns();
}

/* An RST for a pending connect means refused, even where sk_err cannot be read. */
static __always_inline void mark_reset(__u64 sk)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &sk);

	if (p) {
		p->reset = 1;
		if (!p->answer_ns)
			p->answer_ns = bpf_ktime_get_ns();
	}
}

/*
 * The sweeper reports an ended connect once it has removed its entry (`copy`, taken before:
 * a removed entry's memory can be another's at once): whoever removes an entry reports
 * it. Where the buffer has no room, the entry goes back as it was, to be asked about
 * again once the buffer is read.
 */
static __always_inline enum answer report_removed(void *ctx, const struct config *cfg, __u64 sk,
					  const struct pending *copy, struct event *e,
					  int transport)
{
	long err = bpf_map_delete_elem(&pending, &sk);

	if (err == -ENOENT)
		return ANSWER_DONE;
	if (err) {
		count(COUNTER_TABLE_ERRORS);
		return ANSWER_PENDING;
	}
	if (report(ctx, cfg, e, report_kind(e->outcome), transport) != EMIT_NO_ROOM)
		return ANSWER_DONE;
	if (bpf_map_update_elem(&pending, &sk, copy, BPF_NOEXIST)) {
		/* A new connect on the socket took its place this instant. */
		count(COUNTER_DROPPED);
		return ANSWER_DONE;
	}
	count(COUNTER_RETRIED);
	return ANSWER_NO_ROOM;
}

/*
 * The sweeper's question about a connect pending a while: is its socket still in SYN_SENT?
 * Run on demand from userspace (BPF_PROG_TEST_RUN runs a raw tracepoint program from Linux
 * 5.10, commit 1b4d60ec162f "bpf: Enable BPF_PROG_TEST_RUN for raw_tracepoint") with the
 * socket in ctx[0]. A connect whose socket has left SYN_SENT ended without any probe
 * seeing it: it is reported now, its latency bounded by when it was last found pending
 * and now. Asked about a kept key, it reports the end kept there.
 */
static __always_inline enum answer confirm_pending(__u64 *ctx, int transport)
{
	const struct config *cfg = get_config();
	__u64 sk = ctx[0];
	struct pending copy;
	struct peer now = {};
	struct event e = {};
	struct pending *p;
	__u8 state;
	int same;

	if (!cfg)
		return ANSWER_PENDING;
	p = bpf_map_lookup_elem(&pending, &sk);
	if (!p)
		return ANSWER_DONE;
	if (is_kept_key(sk)) {
		describe_kept_end(p, &e);
		__builtin_memcpy(&copy, p, sizeof(copy));
		return report_removed(ctx, cfg, sk, &copy, &e, transport);
	}
	/* The state before the entry's flags: the kernel stores a new state only after the
	 * probes on the change have run, so a state out of SYN_SENT means they are done. */
	state = sock_state(cfg, sk);
	read_sock_peer(cfg, sk, &now);
	if (p->reported) {
		bpf_map_delete_elem(&pending, &sk);
		return ANSWER_DONE;
	}
	/* Unreadable memory reads as zeros: no family, no match. */
	same = (now.family == FAMILY_INET || now.family == FAMILY_INET6) &&
	       now.family == p->family && now.dport == p->dport &&
	       same_address(now.daddr, p->daddr);
	e.ts_ns = bpf_ktime_get_ns();
	e.af = now.family;
	read_sock_source(cfg, sk, &e);
	if (same && state == TCP_SYN_SENT) {
		p->confirmed_ns = e.ts_ns;
		p->lport = e.lport;
		__builtin_memcpy(p->saddr, e.saddr, sizeof(p->saddr));
		return ANSWER_PENDING;
	}
	if (!same || !e.lport) {
		/* Failed (the kernel released the port), or the socket is gone: the source as
		 * last found. */
		describe_connect(p, &e);
	} else {
		__u16 lport = e.lport;
		__u8 saddr[16];

		__builtin_memcpy(saddr, e.saddr, sizeof(saddr));
		describe_connect(p, &e);
		e.lport = lport;
		__builtin_memcpy(e.saddr, saddr, sizeof(saddr));
	}
	e.delta_ns = since(p->start_ns, e.ts_ns);
	e.delta_min_ns = since(p->start_ns, p->confirmed_ns);
	if (same) {
		e.end = END_INFERRED;
		if (state == TCP_CLOSE) {
			e.error = sock_error(cfg, sk);
			e.outcome = closed_outcome(p, e.error);
		} else {
			e.outcome = OUTCOME_ESTABLISHED;
		}
	} else {
		/* Closed and freed, its memory perhaps another socket's: how it ended is lost. */
		e.end = END_GONE;
		e.outcome = OUTCOME_UNKNOWN;
	}
	__builtin_memcpy(&copy, p, sizeof(copy));
	return report_removed(ctx, cfg, sk, &copy, &e, transport);
}

/* The sweeper's question, for one transport. Never attached: only run on demand. */
#define CONFIRM_PROGRAM(name, transport)                                                \
	SEC("raw_tp")                                                                   \
	int name(__u64 *ctx)                                                            \
	{                                                                               \
		return confirm_pending(ctx, transport);                                 \
	}

#ifndef TCPCONNLAT_LEGACY
/*
 * sock:inet_sock_set_state: CLOSE -> SYN_SENT remembers a connect, leaving SYN_SENT
 * finishes it, reading the record as `read` says.
 */
static __always_inline int handle_state(void *ctx, int transport, enum record_read read)
{
	const struct state_record *r = ctx;
	const struct config *cfg;
	struct state_change sc;

	/* Most state changes are none of ours: read directly or as arguments, they cost two
	 * loads. */
	if (read == READ_RECORD_DIRECT && r->oldstate != TCP_SYN_SENT && r->newstate != TCP_SYN_SENT)
		return 0;
#ifdef SOCK_BY_BTF
	if (reads_socket(read) && ((const __u64 *)ctx)[1] != TCP_SYN_SENT &&
	    ((const __u64 *)ctx)[2] != TCP_SYN_SENT)
		return 0;
#endif
	cfg = get_config();
	if (!cfg || read_state_change(ctx, &cfg->tp, read, &sc) || sc.protocol != IPPROTO_TCP)
		return 0;
	if (sc.newstate == TCP_SYN_SENT) {
		if (sc.oldstate == TCP_CLOSE) {
			struct peer to = {.family = sc.family};

			read_peer(ctx, &cfg->tp, read, &to, sc.skaddr);
			remember_connect(ctx, cfg, sc.skaddr, &to, transport);
		}
		return 0;
	}
	if (sc.oldstate == TCP_SYN_SENT) {
		/* Zeroed here, not on the state changes that return above (most of them). */
		struct pending *p = pending_connect(sc.skaddr);
		struct peer to = {.family = sc.family};
		struct event e = {};
		__u8 kind;

		if (!p)
			return 0;
		read_peer(ctx, &cfg->tp, read, &to, sc.skaddr);
		kind = finish_connect(ctx, cfg, sc.skaddr, p, sc.newstate, &to, &e, transport);
		if (!kind)
			return 0;
		read_source(ctx, &cfg->tp, read, &e, sc.skaddr);
		settle_connect(ctx, cfg, sc.skaddr, p, &e, kind, transport);
	}
	return 0;
}

/* The tcp: tracepoints whose records name a socket of ours, after the state machine's. */
enum sock_record {
	RECORD_RETRANSMIT, /* tcp:tcp_retransmit_skb: count a SYN sent again */
	RECORD_RESET,      /* tcp:tcp_receive_reset: the answer was an RST */
};

static __always_inline int handle_sock_record(void *ctx, enum sock_record kind)
{
	const struct config *cfg = get_config();
	__u64 sk;

	if (!cfg)
		return 0;
	if (READ_AT(sk, ctx, kind == RECORD_RESET ? cfg->reset_skaddr : cfg->retransmit_skaddr))
		return 0;
	if (kind == RECORD_RESET)
		mark_reset(sk);
	else
		count_retransmit(sk);
	return 0;
}

/* The state machine's program on `section`, for one transport and one way of reading the
 * record (or the socket). */
#define STATE_PROGRAM(name, section, transport, read)                                   \
	SEC(section)                                                                    \
	int name(void *ctx)                                                             \
	{                                                                               \
		return handle_state(ctx, transport, read);                              \
	}

/* The same, once per transport: `name`_rb and `name`_pb (compat's Transport::suffix). */
#define STATE_PROGRAM_PAIR(name, section, read)                                         \
	STATE_PROGRAM(name##_rb, section, TRANSPORT_RINGBUF, read)                      \
	STATE_PROGRAM(name##_pb, section, TRANSPORT_PERFBUF, read)

/* The programs every object but legacy's has: one each for retransmits and RSTs, and the
 * sweeper's question, per transport. */
#define SOCK_RECORD_PROGRAMS()                                                          \
	CONFIRM_PROGRAM(confirm_rb, TRANSPORT_RINGBUF)                                  \
	CONFIRM_PROGRAM(confirm_pb, TRANSPORT_PERFBUF)                                  \
	SEC("tracepoint/tcp/tcp_retransmit_skb")                                        \
	int tp_retransmit(void *ctx)                                                    \
	{                                                                               \
		return handle_sock_record(ctx, RECORD_RETRANSMIT);                      \
	}                                                                               \
	SEC("tracepoint/tcp/tcp_receive_reset")                                         \
	int tp_reset(void *ctx)                                                         \
	{                                                                               \
		return handle_sock_record(ctx, RECORD_RESET);                           \
	}

#define TRACEPOINT_SECTION "tracepoint/sock/inet_sock_set_state"

/* With the state machine on the tracepoint: per transport, the record read at its offsets
 * or directly. */
#define STATE_PROGRAMS()                                                                \
	SOCK_RECORD_PROGRAMS()                                                          \
	STATE_PROGRAM_PAIR(tp_state, TRACEPOINT_SECTION, READ_RECORD_AT_OFFSETS)        \
	STATE_PROGRAM_PAIR(tp_state_direct, TRACEPOINT_SECTION, READ_RECORD_DIRECT)

/*
 * With the state machine on the raw tracepoint (Linux 4.17, commit c4f6699dfcb8 "bpf:
 * introduce BPF_RAW_TRACEPOINT"), per transport: the kernel calls it with the socket and
 * both states, without building the record that the tracepoint copies the socket's
 * addresses into on every state change of every socket. Plain (the socket's fields
 * through the helper), and BTF-typed (Linux 5.5, commit 9e15db66136a "bpf: Implement
 * accurate raw_tp context access via BTF"): a tracing program, whose loads of the
 * socket's fields the verifier allows. Only for objects that read the socket by BTF.
 */
#define RAW_SECTION "raw_tp/inet_sock_set_state"
#define BTF_SECTION "tp_btf/inet_sock_set_state"
#define RAW_STATE_PROGRAMS()                                                            \
	SOCK_RECORD_PROGRAMS()                                                          \
	STATE_PROGRAM_PAIR(raw_state, RAW_SECTION, READ_RAW_SOCKET)                     \
	STATE_PROGRAM_PAIR(btf_state, BTF_SECTION, READ_BTF_SOCKET)
#endif /* !TCPCONNLAT_LEGACY */

#endif /* TCPCONNLAT_COMMON_BPF_H */

/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Maps and logic shared by every probe object: the pending-connect table, the
 * configuration, the emit path for both transports, and the reading of the
 * sock:inet_sock_set_state record by the offsets userspace found in its format file.
 * Nothing here uses CO-RE, so objects that must load without BTF can include it.
 */
#ifndef TCPCONNLAT_COMMON_BPF_H
#define TCPCONNLAT_COMMON_BPF_H

#include "tcpconnlat.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

/* Userspace may resize both before load; these are the defaults. */
#define MAX_PENDING 16384
#define RINGBUF_BYTES (256 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config_map SEC(".maps");

/* LRU so that a flood of connects that never complete cannot fill it for good. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PENDING);
	__type(key, __u64);
	__type(value, struct pending);
} pending SEC(".maps");

/* Events dropped because the ring buffer was full (perf buffer losses come from perf itself). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
} events_rb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events_pb SEC(".maps");

static __always_inline const struct config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config_map, &zero);
}

/* Remember a connect that just sent its SYN, if the filters want it. */
static __always_inline void remember_connect(const struct config *cfg, __u64 sk, __u16 family)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct pending p = {};

	if (cfg->target_tgid && cfg->target_tgid != tgid)
		return;
	if (cfg->target_family && cfg->target_family != family)
		return;
	p.start_ns = bpf_ktime_get_ns();
	p.tgid = tgid;
	bpf_get_current_comm(&p.comm, sizeof(p.comm));
	bpf_map_update_elem(&pending, &sk, &p, BPF_ANY);
}

/*
 * Emit one event. The ring buffer does not wake the reader for each event (wakeups are
 * what tracing costs, not the probe): userspace drains it on a short timer, and the
 * probe forces a wakeup only once enough has queued up that waiting could overflow it.
 */
static __always_inline void submit(void *ctx, const struct config *cfg, struct event *e,
				   int transport)
{
	if (transport == TRANSPORT_RINGBUF) {
		__u64 flags = BPF_RB_NO_WAKEUP;

		if (bpf_ringbuf_query(&events_rb, BPF_RB_AVAIL_DATA) >= cfg->wakeup_bytes)
			flags = BPF_RB_FORCE_WAKEUP;
		if (bpf_ringbuf_output(&events_rb, e, sizeof(*e), flags)) {
			__u32 zero = 0;
			__u64 *n = bpf_map_lookup_elem(&dropped, &zero);

			if (n)
				__sync_fetch_and_add(n, 1);
		}
	} else {
		bpf_perf_event_output(ctx, &events_pb, BPF_F_CURRENT_CPU, e, sizeof(*e));
	}
}

/*
 * Finish a pending connect: fill in who and how long, and emit it if slow enough.
 * The caller has put addresses, ports and family into *e. Returns nothing: the entry
 * is always removed, reported or not.
 */
static __always_inline void complete_connect(void *ctx, const struct config *cfg, __u64 sk,
					     struct event *e, int transport)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &sk);

	if (!p)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->delta_ns = e->ts_ns - p->start_ns;
	e->tgid = p->tgid;
	__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	if (e->delta_ns >= cfg->min_lat_ns)
		submit(ctx, cfg, e, transport);
	bpf_map_delete_elem(&pending, &sk);
}

/* The fields of one sock:inet_sock_set_state record that we use. */
struct state_change {
	__u64 skaddr;
	int oldstate;
	int newstate;
	__u16 family;
	__u16 protocol;
};

#define READ_TP_FIELD(dst, ctx, off) bpf_probe_read(&(dst), sizeof(dst), (char *)(ctx) + (off))

static __always_inline int read_state_change(void *ctx, const struct state_layout *l,
					     struct state_change *sc)
{
	if (READ_TP_FIELD(sc->skaddr, ctx, l->skaddr) ||
	    READ_TP_FIELD(sc->oldstate, ctx, l->oldstate) ||
	    READ_TP_FIELD(sc->newstate, ctx, l->newstate) ||
	    READ_TP_FIELD(sc->family, ctx, l->family))
		return -1;
	sc->protocol = IPPROTO_TCP;
	if (l->protocol && READ_TP_FIELD(sc->protocol, ctx, l->protocol))
		return -1;
	return 0;
}

/* A connect that leaves SYN_SENT any other way than by our completion hook is forgotten. */
static __always_inline int forget_if_done(const struct state_change *sc)
{
	if (sc->oldstate == TCP_SYN_SENT && sc->newstate != TCP_SYN_SENT) {
		bpf_map_delete_elem(&pending, &sc->skaddr);
		return 1;
	}
	return 0;
}

#endif /* TCPCONNLAT_COMMON_BPF_H */

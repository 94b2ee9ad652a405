// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Never loaded. It only puts every struct of tcpconnlat.h into BTF so that libbpf-cargo
 * generates the matching Rust types (the probes keep some of them on the stack only,
 * where BTF does not see them).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tcpconnlat.h"

struct config shared_config;
struct pending shared_pending;
struct event shared_event;
struct state_record shared_state_record;

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Never loaded. It only puts every struct and enum of tcpconnlat.h and discover.h into BTF so that
 * libbpf-cargo generates the matching Rust types and constants (the probes keep some of
 * them on the stack only, where BTF does not see them).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "tcpconnlat.h"
#include "discover.h"

struct config shared_config;
struct pending shared_pending;
struct event shared_event;
struct state_record shared_state_record;
enum transport shared_transport;
enum counter shared_counter;
enum outcome shared_outcome;
enum end_kind shared_end_kind;
enum answer shared_answer;
enum report shared_report;
enum address_family shared_address_family;
enum limits shared_limits;
struct discover_config shared_discover_config;
struct discover_mark shared_discover_mark;
enum snapshot_size shared_snapshot_size;
enum snapshot_phase shared_snapshot_phase;

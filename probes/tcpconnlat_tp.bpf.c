// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Tracepoint mode: everything from tracepoints read by format-file offsets, so this object
 * has no CO-RE relocation and needs neither kprobes, fentry nor BTF. The clock starts at
 * CLOSE -> SYN_SENT (in the connecting process) and the common state machine reports the
 * connect when it leaves SYN_SENT. sk_err is read at the offset userspace found in the
 * kernel's BTF; without BTF it is unknown, and failures are told apart by the RST
 * tracepoint alone (refused) or else reported as timeouts.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

STATE_PROGRAMS()

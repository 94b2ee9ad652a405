// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The smallest fentry program: loading and attaching it tells whether this kernel lets us
 * use fentry at all (hardened kernels refuse with EPERM even to root). Detached at once.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("fentry/tcp_v4_connect")
int BPF_PROG(trial_fentry)
{
	return 0;
}

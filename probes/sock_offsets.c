// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Never loaded or linked. build.rs compiles it to assembly against a kernel's headers
 * (KERNEL_HEADERS) and reads the struct sock offsets legacy mode needs from the constants
 * below, for kernels that have no BTF to read them from at run time. The names match
 * struct sock_layout in tcpconnlat.h.
 */
#include <linux/stddef.h>
#include <net/sock.h>

#define OFFSET(name, member) \
	const unsigned long tcpconnlat_offset_##name = offsetof(struct sock, member);

OFFSET(family, __sk_common.skc_family)
OFFSET(state, __sk_common.skc_state)
OFFSET(num, __sk_common.skc_num)
OFFSET(dport, __sk_common.skc_dport)
OFFSET(rcv_saddr, __sk_common.skc_rcv_saddr)
OFFSET(daddr, __sk_common.skc_daddr)
OFFSET(v6_rcv_saddr, __sk_common.skc_v6_rcv_saddr)
OFFSET(v6_daddr, __sk_common.skc_v6_daddr)
OFFSET(err, sk_err)
OFFSET(err_soft, sk_err_soft)

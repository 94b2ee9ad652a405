/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The fields of struct sock that the probes without CO-RE read, at offsets found at run
 * time (BTF) or at build time (kernel headers): SOCK_FIELD(name, member in struct sock).
 * This list is the one definition: struct sock_layout (tcpconnlat.h), the offsets
 * compiled from kernel headers (sock_offsets.c, build.rs) and the BTF reader of
 * tcpconnlat-compat all derive from it. Offsets are 16-bit, in this order.
 */
SOCK_FIELD(family, __sk_common.skc_family)
SOCK_FIELD(state, __sk_common.skc_state)
SOCK_FIELD(num, __sk_common.skc_num)             /* local port, host order */
SOCK_FIELD(dport, __sk_common.skc_dport)         /* network order */
SOCK_FIELD(rcv_saddr, __sk_common.skc_rcv_saddr)
SOCK_FIELD(daddr, __sk_common.skc_daddr)
SOCK_FIELD(v6_rcv_saddr, __sk_common.skc_v6_rcv_saddr)
SOCK_FIELD(v6_daddr, __sk_common.skc_v6_daddr)
SOCK_FIELD(err, sk_err)
SOCK_FIELD(err_soft, sk_err_soft)               /* an ICMP error that came while locked */

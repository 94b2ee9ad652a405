// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Never loaded or linked. build.rs compiles it to assembly against a kernel's headers
 * (KERNEL_HEADERS) and reads the struct sock offsets legacy mode needs from the constants
 * below (one per field of sock_fields.h), for kernels that have no BTF to read them from
 * at run time.
 */
#include <linux/stddef.h>
#include <net/sock.h>

#define SOCK_FIELD(name, member) \
	const unsigned long tcpconnlat_offset_##name = offsetof(struct sock, member);
#include "sock_fields.h"

//! Legacy mode: the probe object itself (no BTF, no global data, no ring buffer, old
//! helpers only), tracefs kprobes that clean up after a kill -9, and the same events as
//! fentry. Where this kernel cannot run legacy mode, the error the user gets.

mod support;

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use libbpf_rs::{MapType, ObjectBuilder};
use object::{Object, ObjectSection};
use serde_json::Value;
use support::*;

/// Helpers every kernel since 4.4 has: map lookup/update/delete, probe_read, ktime_get_ns,
/// get_current_pid_tgid, get_current_uid_gid, get_current_comm, get_smp_processor_id,
/// perf_event_output.
const OLD_HELPERS: [i32; 10] = [1, 2, 3, 4, 5, 8, 14, 15, 16, 25];
const PERF_EVENT_OUTPUT: i32 = 25;
const PROBE_READ: i32 = 4;
const GET_SMP_PROCESSOR_ID: i32 = 8;

#[test]
fn the_legacy_object_needs_nothing_old_kernels_lack() {
    let (programs, maps) = check_for_linux_4_4(probes::bytes(ProbeObject::Legacy));
    assert_eq!(
        programs,
        [
            "confirm_pb",
            "legacy_rcv_state",
            "legacy_reset",
            "legacy_retransmit",
            "legacy_set_state"
        ],
        "set_state (start and end), rcv_state, retransmit, reset; and the sweeper's question \
         (loaded only where the kernel runs a program on demand, yet held to the same limits)"
    );
    assert!(
        maps.contains("events_pb") && !maps.contains("events_rb"),
        "{maps:?}"
    );
}

#[test]
fn the_discovery_object_needs_nothing_old_kernels_lack() {
    let (programs, _) = check_for_linux_4_4(probes::bytes(ProbeObject::Discover));
    assert_eq!(programs, ["discover_set_state"]);
}

/// Check an object against what Linux 4.4 offers: no global data, no CO-RE relocation,
/// only old map types and helpers, the v1 instruction set, no loop, few instructions, and
/// perf events written to this CPU's buffer by number (BPF_F_CURRENT_CPU is 4.7+). Its
/// programs and maps, by name.
fn check_for_linux_4_4(object: &[u8]) -> (Vec<String>, HashSet<String>) {
    let elf = object::File::parse(object).unwrap();
    for section in elf.sections() {
        let name = section.name().unwrap();
        assert!(
            !name.starts_with(".rodata") && !name.starts_with(".data") && !name.starts_with(".bss"),
            "global data section {name}: kernels before 5.2 cannot create its map"
        );
    }
    // .BTF.ext: magic, version, flags, hdr_len, then (off, len) for func_info, line_info and,
    // in headers of 32 bytes and more, CO-RE relocations.
    let ext = elf
        .section_by_name(".BTF.ext")
        .map(|s| s.data().unwrap().to_vec())
        .unwrap_or_default();
    if ext.len() >= 32 {
        let word = |at: usize| u32::from_le_bytes(ext[at..at + 4].try_into().unwrap());
        if word(4) >= 32 {
            assert_eq!(
                word(28),
                0,
                "the legacy object has CO-RE relocations: it would need BTF"
            );
        }
    }

    let open = ObjectBuilder::default().open_memory(object).unwrap();
    let mut maps = HashSet::new();
    for map in open.maps() {
        let kind = map.map_type();
        assert!(
            matches!(
                kind,
                MapType::Array | MapType::Hash | MapType::PerfEventArray
            ),
            "map {:?} is a {kind:?}: not on Linux 4.4 (LRU maps are 4.10+)",
            map.name()
        );
        maps.insert(map.name().to_string_lossy().into_owned());
    }
    let mut programs = Vec::new();
    for prog in open.progs() {
        let name = prog.name().to_string_lossy().into_owned();
        let insns = prog.insns();
        assert!(insns.len() < 4096, "{name}: {} instructions", insns.len());
        let mut helpers = HashSet::new();
        for insn in insns {
            let (class, op) = (insn.code & 0x07, insn.code & 0xf0);
            if class == 0x05 && op == 0x80 && insn.src_reg() == 0 {
                assert!(
                    OLD_HELPERS.contains(&insn.imm),
                    "{name} calls helper {}",
                    insn.imm
                );
                helpers.insert(insn.imm);
            }
            if let Some(newer) = newer_than_v1(insn) {
                panic!("{name}: {newer}");
            }
        }
        let on_stack = stack_pointers(insns);
        for (i, insn) in insns.iter().enumerate() {
            let is_call = insn.code == 0x85 && insn.src_reg() == 0;
            if is_call && insn.imm == PROBE_READ {
                assert!(
                    on_stack[i].is_some_and(|regs| regs & 1 << 1 != 0),
                    "{name}: bpf_probe_read at {i} writes elsewhere than the stack (4.4-4.6 allow no other)"
                );
            }
        }
        if helpers.contains(&PERF_EVENT_OUTPUT) {
            assert!(
                helpers.contains(&GET_SMP_PROCESSOR_ID),
                "{name}: perf_event_output without this CPU's number"
            );
        }
        // Before 5.3 the verifier rejects any loop (a back-edge in the control flow).
        assert!(!has_loop(insns), "{name} has a loop");
        programs.push(name);
    }
    programs.sort();
    (programs, maps)
}

/// For each instruction, the registers (bit n: rn) that point into the stack on every path
/// that reaches it, or `None` where none does: set from r10 (`r1 = r10`), copied
/// (`r7 = r1`), moved by constants (`r7 += -256`) and spilled to the stack and filled back
/// (`*(u64 *)(r10 - 8) = r7`, `r1 = *(u64 *)(r10 - 8)`), as clang emits stack addresses. A
/// forward pass in program order covers every path, since the programs have no loop (all
/// jumps go forward, asserted apart); where paths join, only what holds on all of them.
fn stack_pointers(insns: &[libbpf_rs::libbpf_sys::bpf_insn]) -> Vec<Option<u16>> {
    stack_state(insns)
        .into_iter()
        .map(|state| state.map(|(regs, _)| regs))
        .collect()
}

/// [`stack_pointers`] with, beside the registers, the 8-byte stack slots (bit n: r10 -
/// 8(n + 1)) that hold a stack pointer.
fn stack_state(insns: &[libbpf_rs::libbpf_sys::bpf_insn]) -> Vec<Option<(u16, u64)>> {
    const FP: u16 = 1 << 10;
    // The slot a 64-bit access at r10 + off is, if it is one.
    let slot = |off: i16| (off < 0 && off % 8 == 0 && off >= -512).then(|| (-off / 8 - 1) as u32);
    let mut at: Vec<Option<(u16, u64)>> = vec![None; insns.len() + 2];
    at[0] = Some((FP, 0));
    for (i, insn) in insns.iter().enumerate() {
        let Some((regs, slots)) = at[i] else {
            continue; // unreachable, or the second half of a 16-byte ld_imm64
        };
        let (dst, src) = (1u16 << insn.dst_reg(), 1u16 << insn.src_reg());
        let (class, op) = (insn.code & 0x07, insn.code & 0xf0);
        let target = (i as i64 + 1 + i64::from(insn.off)) as usize;
        let dw = insn.code & 0x18 == 0x18; // BPF_DW
        let (out_regs, out_slots, next): (u16, u64, &[usize]) = match (class, op) {
            _ if insn.code == 0x18 => (regs & !dst, slots, &[i + 2]), // ld_imm64
            (0x05, 0x80) => (regs & !0b11_1111, slots, &[i + 1]),     // call: r0-r5 clobbered
            (0x05, 0x90) => (regs, slots, &[]),                       // exit
            (0x05, 0x00) => (regs, slots, &[target]),                 // goto
            (0x05 | 0x06, _) => (regs, slots, &[i + 1, target]),      // conditional jump
            (0x07, 0xb0) if insn.code & 0x08 != 0 => {
                // r_dst = r_src
                let copied = if regs & src != 0 { dst } else { 0 };
                ((regs & !dst) | copied, slots, &[i + 1])
            }
            (0x07, 0x00 | 0x10) if insn.code & 0x08 == 0 => (regs, slots, &[i + 1]), // += or -= imm
            // A store through r10: a slot that now holds what was stored (a stack pointer
            // only from a 64-bit store of one), or a slot no more.
            (0x02 | 0x03, _) if insn.dst_reg() == 10 => {
                let touched = slot(insn.off & !7).map_or(0, |n| 1u64 << n);
                let spilled = class == 0x03 && dw && insn.code & 0xe0 == 0x60 && regs & src != 0;
                let slots = (slots & !touched) | if spilled { touched } else { 0 };
                (regs, slots, &[i + 1])
            }
            (0x02 | 0x03, _) => (regs, slots, &[i + 1]), // stores elsewhere
            // A 64-bit load from a slot holding a stack pointer.
            (0x01, _) if insn.src_reg() == 10 && dw => {
                let filled = slot(insn.off).is_some_and(|n| slots & (1 << n) != 0);
                (
                    (regs & !dst) | if filled { dst } else { 0 },
                    slots,
                    &[i + 1],
                )
            }
            (0x00, _) => (regs & !1, slots, &[i + 1]), // legacy packet loads set r0
            _ => (regs & !dst, slots, &[i + 1]),       // anything else computes dst afresh
        };
        for &n in next {
            if n < at.len() {
                at[n] = Some(match at[n] {
                    Some((r, s)) => (r & out_regs, s & out_slots),
                    None => (out_regs, out_slots),
                });
            }
        }
    }
    at.truncate(insns.len());
    at
}

#[test]
fn the_stack_check_tells_stack_pointers_from_others() {
    use libbpf_rs::libbpf_sys::bpf_insn;
    let insn = |code: u8, dst: u8, src: u8| {
        let mut i = bpf_insn {
            code,
            ..Default::default()
        };
        i.set_dst_reg(dst);
        i.set_src_reg(src);
        i
    };
    let jump = |code: u8, off: i16| bpf_insn {
        code,
        off,
        ..Default::default()
    };
    // Whether r1 points into the stack at the end of `program`.
    let r1_on_stack = |program: &[bpf_insn]| {
        let mut with_call = program.to_vec();
        with_call.push(insn(0x85, 0, 0));
        stack_pointers(&with_call)[program.len()].is_some_and(|regs| regs & 2 != 0)
    };
    let mov_fp = insn(0xbf, 1, 10);
    let add = insn(0x07, 1, 0);
    let store = insn(0x7b, 1, 2); // *(u64 *)(r1 + 0) = r2: writes memory, not r1
    let mov_r6 = insn(0xbf, 1, 6);
    let load = insn(0x79, 1, 6); // r1 = *(u64 *)(r6 + 0)
    assert!(r1_on_stack(&[mov_fp, add]));
    assert!(r1_on_stack(&[mov_fp, add, store, insn(0xb7, 2, 0)]));
    assert!(!r1_on_stack(&[mov_r6, add]));
    assert!(!r1_on_stack(&[mov_fp, load]));
    assert!(!r1_on_stack(&[add]));
    // Through a callee-saved register, across a call; not through a clobbered one.
    let (r7_fp, r1_r7, r2_fp) = (insn(0xbf, 7, 10), insn(0xbf, 1, 7), insn(0xbf, 2, 10));
    let call = insn(0x85, 0, 0);
    assert!(r1_on_stack(&[r7_fp, insn(0x07, 7, 0), call, r1_r7]));
    assert!(!r1_on_stack(&[r2_fp, call, insn(0xbf, 1, 2)]));
    // Across a branch that leaves r1 alone, and a goto over what would change it.
    let branch = jump(0x15, 1); // if r0 == 0 goto +1
    assert!(r1_on_stack(&[mov_fp, branch, insn(0xb7, 2, 0), add]));
    assert!(r1_on_stack(&[mov_fp, jump(0x05, 1), load, add]));
    // Not where one path gives r1 another value: the branch skips the stack pointer, or
    // takes a load.
    assert!(!r1_on_stack(&[mov_r6, branch, mov_fp, add]));
    assert!(!r1_on_stack(&[mov_fp, branch, load, add]));
    // Spilled to the stack and filled back; not once the slot was written over, nor from
    // another slot.
    let spill = |reg: u8, off: i16| {
        let mut i = insn(0x7b, 10, reg); // *(u64 *)(r10 + off) = reg
        i.off = off;
        i
    };
    let fill = |off: i16| {
        let mut i = insn(0x79, 1, 10); // r1 = *(u64 *)(r10 + off)
        i.off = off;
        i
    };
    let r7 = insn(0xbf, 7, 10);
    assert!(r1_on_stack(&[r7, spill(7, -384), call, fill(-384)]));
    assert!(!r1_on_stack(&[
        r7,
        spill(7, -384),
        spill(6, -384),
        fill(-384)
    ]));
    assert!(!r1_on_stack(&[r7, spill(7, -384), fill(-376)]));
    assert!(!r1_on_stack(&[
        insn(0xbf, 7, 6),
        spill(7, -384),
        fill(-384)
    ]));
}

/// What makes an instruction newer than the BPF v1 set, if anything: BPF_JMP32 is v3
/// (Linux 5.1+); JLT, JLE, JSLT and JSLE are v2 (4.14+).
fn newer_than_v1(insn: &libbpf_rs::libbpf_sys::bpf_insn) -> Option<&'static str> {
    let (class, op) = (insn.code & 0x07, insn.code & 0xf0);
    match (class, op) {
        (0x06, _) => Some("a 32-bit jump (BPF v3, Linux 5.1+)"),
        (0x05, 0xa0 | 0xb0 | 0xc0 | 0xd0) => Some("a BPF v2 jump (Linux 4.14+)"),
        _ => None,
    }
}

#[test]
fn the_instruction_set_check_finds_newer_jumps() {
    use libbpf_rs::libbpf_sys::bpf_insn;
    let insn = |code: u8| bpf_insn {
        code,
        ..Default::default()
    };
    assert!(newer_than_v1(&insn(0x16)).is_some()); // jeq32
    assert!(newer_than_v1(&insn(0xa5)).is_some()); // jlt
    assert!(newer_than_v1(&insn(0x15)).is_none()); // jeq
    assert!(newer_than_v1(&insn(0x25)).is_none()); // jgt
    assert!(newer_than_v1(&insn(0x95)).is_none()); // exit
}

/// Whether the control flow of a program has a cycle (depth-first search for a back-edge).
fn has_loop(insns: &[libbpf_rs::libbpf_sys::bpf_insn]) -> bool {
    let successors = |i: usize| -> Vec<usize> {
        let insn = &insns[i];
        let (class, op) = (insn.code & 0x07, insn.code & 0xf0);
        let target = (i as i64 + 1 + i64::from(insn.off)) as usize;
        match (class, op) {
            (0x00, _) if insn.code == 0x18 => vec![i + 2], // 16-byte ld_imm64
            (0x05 | 0x06, 0x90) => vec![],                 // exit
            (0x05 | 0x06, 0x80) => vec![i + 1],            // call
            (0x05, 0x00) => vec![target],                  // goto
            (0x05 | 0x06, _) => vec![i + 1, target],       // conditional jump
            _ => vec![i + 1],
        }
    };
    // 0 unseen, 1 on the current path, 2 done.
    let mut state = vec![0u8; insns.len() + 2];
    let mut stack = vec![(0usize, 0usize)];
    state[0] = 1;
    while let Some(&mut (node, ref mut next)) = stack.last_mut() {
        let succ = successors(node);
        if *next < succ.len() {
            let s = succ[*next];
            *next += 1;
            if s >= insns.len() {
                continue;
            }
            match state[s] {
                1 => return true,
                0 => {
                    state[s] = 1;
                    stack.push((s, 0));
                }
                _ => {}
            }
        } else {
            state[node] = 2;
            stack.pop();
        }
    }
    false
}

#[test]
fn the_loop_check_finds_loops() {
    use libbpf_rs::libbpf_sys::bpf_insn;
    let insn = |code: u8, off: i16| bpf_insn {
        code,
        off,
        ..Default::default()
    };
    // r0 = 0; if r0 == 0 goto -2 (back to the start); exit
    assert!(has_loop(&[insn(0xb7, 0), insn(0x15, -2), insn(0x95, 0)]));
    // A backward jump to an exit already seen is not a loop.
    assert!(!has_loop(&[
        insn(0x15, 1),
        insn(0x05, 1),
        insn(0x95, 0),
        insn(0x05, -2)
    ]));
}

fn kprobe_events(f: &Value) -> PathBuf {
    PathBuf::from(f["tracefs"].as_str().unwrap()).join("kprobe_events")
}

/// The tracefs kprobe events of instance `pid` ("p:tcpconnlat_<pid namespace>_<pid>/...").
fn our_events(f: &Value, pid: u32) -> Vec<String> {
    all_events(f)
        .into_iter()
        .filter(|l| {
            l.split_once("tcpconnlat_")
                .and_then(|(_, group)| group.split('/').next())
                .is_some_and(|group| group.rsplit('_').next() == Some(&pid.to_string()))
        })
        .collect()
}

/// Every tracefs kprobe event of any tcpconnlat.
fn all_events(f: &Value) -> Vec<String> {
    fs::read_to_string(kprobe_events(f))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(":tcpconnlat_"))
        .map(str::to_owned)
        .collect()
}

/// tracefs kprobes are removed on a clean exit, and after a kill -9 by the next start.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn tracefs_kprobes_never_outlive_their_tracer() {
    let _serial = serial();
    let f = features();
    if !legacy_through_tracefs(&f) {
        return;
    }
    let args = ["--json", "--legacy", "--kprobe-attach", "tracefs"];
    let tracer = Tracer::start(&args);
    let pid = tracer.pid();
    assert!(
        !our_events(&f, pid).is_empty(),
        "no tracefs kprobe events while tracing"
    );
    assert!(tracer.interrupt().success());
    assert_eq!(
        our_events(&f, pid),
        Vec::<String>::new(),
        "left behind after SIGINT"
    );

    let mut killed = Tracer::start(&args);
    let pid = killed.pid();
    killed.child.kill().unwrap();
    killed.wait();
    let stale = our_events(&f, pid);
    assert!(
        !stale.is_empty(),
        "kill -9 should leave the events (nothing can run)"
    );
    let next = Tracer::start(&args);
    assert!(
        next.stderr.lock().unwrap().contains("removed"),
        "no word of the cleanup"
    );
    assert_eq!(
        our_events(&f, pid),
        Vec::<String>::new(),
        "stale events not removed"
    );
    assert!(next.interrupt().success());
}

/// The same connects, seen at once by legacy and fentry, give the same events.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn legacy_and_fentry_report_the_same_connects() {
    let _serial = serial();
    let f = features();
    if !usable(&f, "legacy") || !usable(&f, "fentry") {
        for mode in ["legacy", "fentry"] {
            if !usable(&f, mode) {
                let (status, _, err) = run(&["--mode", mode, "-d", "1"]);
                assert_eq!(status.code(), Some(1), "{err}");
                // The last line (notes of cleaning up may come first).
                let last = err.lines().last().unwrap_or_default();
                assert!(
                    last.starts_with(&format!("tcpconnlat: cannot trace in {mode} mode")),
                    "{err}"
                );
            }
        }
        return;
    }
    let me = std::process::id().to_string();
    let legacy = Tracer::start(&["--json", "--legacy", "-p", &me]);
    let fentry = Tracer::start(&["--json", "--mode", "fentry", "-p", &me]);
    let (v4, v6, closed) = (listen("127.0.0.1:0"), listen("[::1]:0"), closed_port());
    let lports: Vec<u16> = [v4, v6, v4].iter().map(|&a| connect(a)).collect();
    let _ = std::net::TcpStream::connect(closed);
    let take = |t: &Tracer| {
        let events = t.events_until(Duration::from_secs(10), |ev| ev.len() >= 4);
        let mut key: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e["pid"].clone(),
                    e["comm"].clone(),
                    e["af"].clone(),
                    e["saddr"].clone(),
                    e["daddr"].clone(),
                    e["dport"].clone(),
                    e["outcome"].clone(),
                    e["errno"].clone(),
                    e["syn_retrans"].clone(),
                    e["uid"].clone(),
                    if e["outcome"] == "refused" {
                        Value::Null
                    } else {
                        e["lport"].clone()
                    },
                )
                    .to_owned()
            })
            .map(|k| format!("{k:?}"))
            .collect();
        key.sort();
        (key, events)
    };
    let (a, ea) = take(&legacy);
    let (b, eb) = take(&fentry);
    assert_eq!(a.len(), 4, "{ea:#?}");
    assert_eq!(a, b, "legacy: {ea:#?}\nfentry: {eb:#?}");
    for lport in lports {
        assert!(ea
            .iter()
            .any(|e| e["lport"] == lport && e["mode"] == "legacy"));
    }
    assert!(legacy.interrupt().success());
    assert!(fentry.interrupt().success());
}

/// Offsets found at start-up are the ones BTF or the built-in headers give, field by field;
/// where the kernel has no kprobes, asking for discovery is one clear error.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn discovered_offsets_are_the_btf_and_header_offsets() {
    let _serial = serial();
    let known = features();
    if known["kprobe_pmu"] != true && known["kprobe_events"] != true {
        let (status, _, err) = run(&["--legacy", "--offsets", "discover", "-d", "1"]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("tcpconnlat: cannot trace in legacy mode"),
            "{err}"
        );
        let (_, out, _) = run(&["--features", "--json", "--offsets", "discover"]);
        let f: Value = serde_json::from_str(&out).unwrap();
        let why = f["sock_offsets_error"].as_str().unwrap_or_default();
        assert!(why.contains("discovery needs kprobes"), "{f}");
        return;
    }
    let (status, out, err) = run(&["--features", "--json", "--offsets", "discover"]);
    assert!(status.success(), "{err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found["sock_offsets_discovered"], true, "{found}");
    assert_eq!(known["sock_offsets_discovered"], false, "{known}");
    let source = known["sock_offsets_source"].as_str().unwrap();
    let (want, got) = (&known["sock_offsets"], &found["sock_offsets"]);
    let fields = want
        .as_object()
        .expect("BTF or built-in headers give the offsets here");
    assert_eq!(fields.len(), got.as_object().unwrap().len());
    for (field, offset) in fields {
        if field == "err_soft" {
            // Never guessed: unknown, and said.
            assert_eq!(got[field], 0, "{found}");
            let notes = found["sock_offsets_notes"].to_string();
            assert!(notes.contains("sk_err_soft"), "{notes}");
            continue;
        }
        assert_eq!(&got[field], offset, "{field}: discovered vs {source}");
    }
    // Every socket, event and kprobe of discovery is gone.
    let events = fs::read_to_string(kprobe_events(&known)).unwrap_or_default();
    assert!(!events.contains("discover"), "{events}");
}

/// The pids of the children of process `pid` (by their PPid: /proc/PID/task/*/children
/// needs CONFIG_PROC_CHILDREN, which small kernels leave out).
fn children(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .any(|l| l.strip_prefix("PPid:").map(str::trim) == Some(&pid.to_string()))
            })
        })
        .collect()
}

/// As in a container without hostPID: a second instance in a private PID and mount
/// namespace, where its pid (1) means nothing to the first. Both trace through tracefs
/// kprobes; killing the second with -9 and starting it again never costs the first an
/// event, and nothing is left once both end.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn instances_in_other_pid_namespaces_keep_their_events() {
    let _serial = serial();
    let f = features();
    if !legacy_through_tracefs(&f) {
        return;
    }
    let server = listen("127.0.0.1:0");
    let port = server.port().to_string();
    let args = [
        "--json",
        "--legacy",
        "--kprobe-attach",
        "tracefs",
        "--dport",
        &port,
    ];
    let contained = ["unshare", "-p", "-f", "--mount-proc"];
    let host = Tracer::start(&args);
    let mine = our_events(&f, host.pid());
    assert!(!mine.is_empty());
    let mut inside = Tracer::start_in(&contained, &args);
    // Its tracer is pid 1 of the namespace: the child of unshare here.
    let tracer = children(inside.pid());
    assert_eq!(tracer.len(), 1, "{tracer:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tracer[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    inside.wait();
    let left = all_events(&f).len() - mine.len();
    assert!(
        left > 0,
        "kill -9 should leave its events (nothing can run)"
    );
    let again = Tracer::start_in(&contained, &args);
    assert!(
        again.stderr.lock().unwrap().contains("removed"),
        "the killed instance's events were not cleaned up"
    );
    assert_eq!(
        our_events(&f, host.pid()),
        mine,
        "the first instance's events changed"
    );
    for _ in 0..5 {
        connect(server);
    }
    for tracer in [&host, &again] {
        let events = tracer.events_until(Duration::from_secs(10), |e| e.len() >= 5);
        assert_eq!(events.len(), 5, "{events:?}");
    }
    assert!(host.interrupt().success());
    // SIGINT to the tracer itself (unshare passes its exit status on, not signals).
    let mut again = again;
    let inner = children(again.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(inner[0] as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(again.wait().success());
    assert_eq!(all_events(&f), Vec::<String>::new(), "left behind");
}

/// Two instances starting at once, each in a PID namespace of its own: each one's
/// cleanup of stale events may remove the other's events before they are opened (neither
/// can tell the other's from a killed instance's). Both must still attach, every time, and
/// nothing is left once both end.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn instances_starting_at_once_both_attach() {
    let _serial = serial();
    let f = features();
    if !legacy_through_tracefs(&f) {
        return;
    }
    let args = ["--json", "--legacy", "--kprobe-attach", "tracefs"];
    let contained = ["unshare", "-p", "-f", "--mount-proc"];
    let rounds = if std::env::var_os("TCPCONNLAT_EMULATED").is_some() {
        5
    } else {
        20
    };
    for round in 0..rounds {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Tracer::start_in(&contained, &args));
            let b = s.spawn(|| Tracer::start_in(&contained, &args));
            (a.join(), b.join())
        });
        let (Ok(a), Ok(b)) = (a, b) else {
            panic!("round {round}: an instance did not attach");
        };
        for mut tracer in [a, b] {
            let inner = children(tracer.pid());
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(inner[0] as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
            assert!(tracer.wait().success(), "round {round}");
        }
        assert_eq!(
            all_events(&f),
            Vec::<String>::new(),
            "round {round}: left behind"
        );
    }
}

/// The DaemonSet's arguments (packaging/kubernetes/daemonset.yaml), with a web
/// configuration of its kind, start the exporter on this kernel in the mode auto picks and
/// in legacy mode where it can run: one manifest for the whole fleet, the oldest nodes
/// included (where legacy mode says the cgroup label is unknown, and serves).
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_daemonset_arguments_run_here() {
    let _serial = serial();
    let ds: Value =
        serde_saphyr::from_str(include_str!("../packaging/kubernetes/daemonset.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("web-config.yml");
    // The example's password hash (packaging/web-config.yml): making one here would wait
    // for the kernel's entropy, which a 4.4 VM gathers for minutes.
    let example = include_str!("../packaging/web-config.yml");
    let hash = example
        .lines()
        .find_map(|l| l.trim().strip_prefix("prometheus: "))
        .expect("the example's user");
    fs::write(
        &config,
        format!("basic_auth_users:\n  prometheus: {hash}\n"),
    )
    .unwrap();
    let args: Vec<String> = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| match a.as_str().unwrap() {
            "$(HOST_IP):10436" => "127.0.0.1:0".to_owned(),
            path if path.ends_with("web-config.yml") => config.to_str().unwrap().to_owned(),
            other => other.to_owned(),
        })
        .collect();
    assert!(args.iter().any(|a| a == "cgroup"), "{args:?}");
    let f = features();
    let mut runs = vec![vec![]];
    if usable(&f, "legacy") {
        runs.push(vec!["--legacy"]);
    }
    for extra in runs {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(&extra);
        all.extend(["-d", "2"]);
        let (status, _, err) = run(&all);
        assert!(status.success(), "{all:?}: {err}");
        assert!(
            err.contains("serving Prometheus metrics at https://127.0.0.1:")
                || err.contains("serving Prometheus metrics at http://127.0.0.1:"),
            "{err}"
        );
        let legacy = err.contains("in legacy mode");
        assert_eq!(
            legacy,
            err.contains("the cgroup label reads \"unknown\" in legacy mode"),
            "{err}"
        );
    }
}

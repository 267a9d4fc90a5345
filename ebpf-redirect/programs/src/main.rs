//! `isthmus-steer`: the TC program Isthmus attaches (TCX, ingress) to
//! workload-facing interfaces.
//!
//! For each IPv4/IPv6 packet a workload sends:
//! 1. egress steering: if the destination lies in an egress policy's
//!    destination prefixes *and* the source in that policy's source prefixes,
//!    the packet is redirected into the tunnel device toward the egress gateway;
//! 2. cross-cluster / node-to-node: if the destination lies in a mesh prefix,
//!    the packet is redirected into the tunnel device;
//! 3. anything else passes untouched. A mesh entry whose target interface is 0
//!    is a *local* entry (a node's own pod prefix inside a steered cluster
//!    prefix): it passes too.
//!
//! Every decision is counted per CPU, per verdict and per map entry.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT};
use aya_ebpf::helpers::{bpf_check_mtu, bpf_redirect};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TcContext;
use isthmus_ebpf_common::{
    Counter, EgressDst, EgressSrc4, EgressSrc6, Target, MAX_COUNTER_SLOTS, MAX_PREFIXES,
    SLOT_MALFORMED, SLOT_PASS, SLOT_REDIRECT, SLOT_REDIRECT_FAILED, SLOT_TOO_BIG,
};

#[map]
static REMOTE4: LpmTrie<[u8; 4], Target> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static REMOTE6: LpmTrie<[u8; 16], Target> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static EGRESS_DST4: LpmTrie<[u8; 4], EgressDst> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static EGRESS_DST6: LpmTrie<[u8; 16], EgressDst> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static EGRESS_SRC4: LpmTrie<EgressSrc4, Target> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static EGRESS_SRC6: LpmTrie<EgressSrc6, Target> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_COUNTER_SLOTS, 0);

const ETH_HLEN: usize = 14;
/// TCX verdict: continue with the next program on the interface (and the
/// legacy tc filters after them). `TC_ACT_OK` would end the chain and skip
/// every other program or filter there, e.g. another CNI's policy.
const TCX_NEXT: i32 = -1;
/// `bpf_check_mtu` flag: check each GSO segment, not the whole super-packet.
const BPF_MTU_CHK_SEGS: u64 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[classifier]
pub fn isthmus_steer(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    let ethertype = match ctx.load::<[u8; 2]>(12) {
        Ok(b) => u16::from_be_bytes(b),
        Err(_) => return pass(len),
    };
    match ethertype {
        ETH_P_IP => steer_v4(&ctx, len),
        ETH_P_IPV6 => steer_v6(&ctx, len),
        _ => pass(len),
    }
}

#[inline(always)]
fn steer_v4(ctx: &TcContext, len: u64) -> i32 {
    // The header must say IPv4 too (version 4, IHL >= 5): the data path
    // routes by the version nibble, so a mismatch must not be steered.
    match ctx.load::<u8>(ETH_HLEN) {
        Ok(b) if b >> 4 == 4 && b & 0x0f >= 5 => {}
        _ => return malformed(len),
    }
    // Source at IP offset 12, destination at 16.
    let (src, dst) = match (
        ctx.load::<[u8; 4]>(ETH_HLEN + 12),
        ctx.load::<[u8; 4]>(ETH_HLEN + 16),
    ) {
        (Ok(s), Ok(d)) => (s, d),
        _ => return malformed(len),
    };
    if let Some(e) = EGRESS_DST4.get(Key::new(32, dst)) {
        let (policy, slot) = (e.policy, e.slot);
        count(slot, len);
        let key = EgressSrc4 {
            policy_be: policy.to_be_bytes(),
            addr: src,
        };
        if let Some(t) = EGRESS_SRC4.get(Key::new(64, key)) {
            return redirect(ctx, t, len, true);
        }
    }
    match REMOTE4.get(Key::new(32, dst)) {
        Some(t) => redirect(ctx, t, len, false),
        None => pass(len),
    }
}

#[inline(always)]
fn steer_v6(ctx: &TcContext, len: u64) -> i32 {
    match ctx.load::<u8>(ETH_HLEN) {
        Ok(b) if b >> 4 == 6 => {}
        _ => return malformed(len),
    }
    // Source at IPv6 offset 8, destination at 24.
    let (src, dst) = match (
        ctx.load::<[u8; 16]>(ETH_HLEN + 8),
        ctx.load::<[u8; 16]>(ETH_HLEN + 24),
    ) {
        (Ok(s), Ok(d)) => (s, d),
        _ => return malformed(len),
    };
    if let Some(e) = EGRESS_DST6.get(Key::new(128, dst)) {
        let (policy, slot) = (e.policy, e.slot);
        count(slot, len);
        let key = EgressSrc6 {
            policy_be: policy.to_be_bytes(),
            addr: src,
        };
        if let Some(t) = EGRESS_SRC6.get(Key::new(160, key)) {
            return redirect(ctx, t, len, true);
        }
    }
    match REMOTE6.get(Key::new(128, dst)) {
        Some(t) => redirect(ctx, t, len, false),
        None => pass(len),
    }
}

#[inline(always)]
fn redirect(ctx: &TcContext, t: &Target, len: u64, egress: bool) -> i32 {
    let (ifindex, slot) = (t.ifindex, t.slot);
    count(slot, len);
    if ifindex == 0 {
        // A local entry (this node's own pods inside a steered prefix): pass.
        return pass(len);
    }
    // A redirect skips the forwarding path's MTU check: a packet the tunnel
    // cannot carry in one piece goes to routing instead (its route into the
    // tunnel carries the tunnel MTU, so the sender learns the path MTU), or is
    // dropped for egress (which has no such route).
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is this program's context pointer, valid for its run.
    let gso = unsafe { (*skb).gso_size } != 0;
    let mut mtu_len: u32 = 0;
    // SAFETY: BPF helper calls on this program's own skb, with a pointer to a
    // local the helper writes the MTU into. The kernel allows the segment
    // check (GSO packets) only without a length adjustment; a plain packet is
    // checked at its L3 length (the frame minus the Ethernet header).
    let fits = unsafe {
        if gso {
            bpf_check_mtu(skb as *mut _, ifindex, &mut mtu_len, 0, BPF_MTU_CHK_SEGS)
        } else {
            bpf_check_mtu(skb as *mut _, ifindex, &mut mtu_len, -(ETH_HLEN as i32), 0)
        }
    } == 0;
    if !fits {
        count(SLOT_TOO_BIG, len);
        return if egress { TC_ACT_SHOT as i32 } else { TCX_NEXT };
    }
    // SAFETY: a BPF helper call with plain integer arguments.
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if verdict == TC_ACT_REDIRECT as i32 {
        count(SLOT_REDIRECT, len);
    } else {
        count(SLOT_REDIRECT_FAILED, len);
    }
    verdict
}

#[inline(always)]
fn pass(len: u64) -> i32 {
    count(SLOT_PASS, len);
    TCX_NEXT
}

#[inline(always)]
fn malformed(len: u64) -> i32 {
    count(SLOT_MALFORMED, len);
    TCX_NEXT
}

#[inline(always)]
fn count(slot: u32, len: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a per-CPU array lookup, so it points at this
        // CPU's valid, aligned slot; no other context writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

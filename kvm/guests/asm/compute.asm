# compute (long mode): a deterministic state machine that mixes general
# registers, the carry flag, SSE state and stack memory. Each iteration
# writes one 32-bit value derived from all of it to port 0xE2; after N
# iterations (qword at 0x6000, 0 = forever) it exits with 0. A vCPU whose
# state is saved and restored at any point must continue the exact same
# sequence (kvm/guests.ComputeModel computes it on the host).
#
# State: RAX = x (64-bit LCG), RBX = acc, R14 = acc2, [RSP] = s (stack
# memory), XMM0 = two 64-bit running sums, CF = carry out of the LCG add,
# which crosses the loop back-edge (dec does not touch CF). Per iteration:
#   acc += x + CF; x *= A; s += 2*acc + 1; acc2 += 8*s;
#   sums = swap(sums + (x, acc));
#   out32 = fold32(sums.lo ^ s ^ x ^ acc2, sums.hi);
#   x += C (sets CF)
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 computes; the others park
    jnz park
    # SSE needs CR0.EM = 0 and CR4.OSFXSR = 1; set them in case the VMM
    # did not (the VMM normally does).
    mov rax, cr0
    and eax, 0xFFFFFFFB           # clear EM (upper 32 bits are reserved 0)
    or eax, 0x2                   # set MP
    mov cr0, rax
    mov rax, cr4
    or eax, 0x600                 # OSFXSR | OSXMMEXCPT
    mov cr4, rax

    mov rcx, qword ptr [PARAM_ITERS]
    movabs rax, 0x0123456789ABCDEF          # x
    movabs r12, 6364136223846793005         # A (Knuth's MMIX LCG)
    movabs r13, 1442695040888963407         # C
    mov ebx, 0x9E3779B9                     # acc
    xor r14d, r14d                          # acc2
    pxor xmm0, xmm0                         # sums
    movabs rdx, 0x5555555555555555
    push rdx                                # s lives in stack memory
    clc                                     # CF for the first adc

1:  adc rbx, rax                  # acc += x + CF
    imul rax, r12                 # x *= A
    pop rdx
    lea rdx, [rdx + rbx*2 + 1]    # s += 2*acc + 1
    push rdx
    lea r14, [r14 + rdx*8]        # acc2 += 8*s
    movq xmm1, rax
    movq xmm2, rbx
    punpcklqdq xmm1, xmm2         # xmm1 = (x, acc)
    paddq xmm0, xmm1              # sums += (x, acc)
    pshufd xmm0, xmm0, 0x4E       # swap the two lanes
    movq xmm2, rdx                # xmm2 = (s, 0)
    pxor xmm2, xmm0
    movq xmm3, rax
    pxor xmm2, xmm3
    movq xmm3, r14
    pxor xmm2, xmm3               # (sums.lo ^ s ^ x ^ acc2, sums.hi)
    pshufd xmm3, xmm2, 0x4E
    pxor xmm2, xmm3               # low qword = lo ^ hi
    pshufd xmm3, xmm2, 0xB1
    pxor xmm2, xmm3               # low dword = xor of the four dwords
    mov r11, rax
    movd eax, xmm2
    out DATA_PORT, eax
    mov rax, r11
    add rax, r13                  # x += C; CF feeds the next adc
    dec rcx                       # N = 0 wraps: effectively forever
    jnz 1b

    pop rdx
    xor eax, eax
    jmp exit

.include "lib64.inc"

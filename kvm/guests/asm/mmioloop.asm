# mmioloop (long mode): N times a 4-byte write to 0xD0000000 (N = qword
# at 0x6000, 0 = forever), then exit with 0. The address has no memory
# slot, so every write is an MMIO exit. The value written is the low 32
# bits of the remaining count (N, N-1, ..., 1).
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    test edi, edi                 # only vCPU 0 loops; the others park
    jnz park
    mov rcx, qword ptr [PARAM_ITERS]
    mov ebx, MMIO_ADDR            # zero-extended (a disp32 would sign-extend)
1:  mov dword ptr [rbx], ecx
    dec rcx                       # N = 0 wraps: effectively forever
    jnz 1b
    xor eax, eax
    jmp exit

.include "lib64.inc"

# smp (long mode): every vCPU atomically increments the dword at 0x7000
# and writes its index to port 0xE1 (32-bit). vCPU 0 then waits (pause
# loop, at most 2^32 spins, else exit 3) until the counter equals the
# number of vCPUs (RSI), prints "smp: N vCPUs up" and exits with 0.
# The other vCPUs park.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
    lock inc dword ptr [COUNTER]
    mov eax, edi
    out PROGRESS_PORT, eax
    test edi, edi
    jnz park
    cld
    mov r12, rsi                  # vCPU count (puts clobbers RSI)
    mov rcx, 1
    shl rcx, 32                   # spin bound
1:  mov eax, dword ptr [COUNTER]
    cmp eax, r12d
    je 2f
    pause
    dec rcx
    jnz 1b
    mov al, 3                     # not every vCPU showed up
    jmp exit
2:  lea rsi, [rip + msg1]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg2]
    call puts
    xor eax, eax
    jmp exit

msg1: .asciz "smp: "
msg2: .asciz " vCPUs up\r\n"

.include "lib64.inc"

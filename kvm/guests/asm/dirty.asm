# dirty (long mode): self-checking memory-dirtying workload for
# live-migration tests.
#
# Range: [16 MiB, 16 MiB + size), size = qword at 0x6008 (0 = 64 MiB),
# clipped to the RAM size in RDX. vCPU i of n (RDI, RSI) owns the i-th
# contiguous slice of the range pages (the last vCPU also takes the
# remainder). Pass p = 1, 2, ...: for every 4 KiB page of the slice check
# that its first and last qword still hold p-1 (pass 1 expects 0), then
# write p to both. After each pass write p to port 0xE1 (32-bit). After
# the number of passes at 0x6010 (0 = forever) the vCPU increments the
# dword at 0x7000 (lock); vCPU 0 waits until all n vCPUs did, then exits
# with 0; the others park. On a mismatch the vCPU prints
#   dirty: LOST WRITE page=0x<hex> want=<dec> got=<dec>
# on COM1 and exits with 1.
.intel_syntax noprefix
.code64
.text
.include "abi.inc"
.globl _start
_start:
.set DIRTY_BASE,    0x1000000     # 16 MiB
.set DIRTY_DEFAULT, 0x4000000     # 64 MiB
    cld
    mov r15, rdi                  # r15 = vCPU index
    mov r14, rsi                  # r14 = vCPU count (at least 1)
    test r14, r14
    jnz 1f
    mov r14d, 1
1:  mov rax, qword ptr [PARAM_DSIZE]
    test rax, rax
    jnz 2f
    mov eax, DIRTY_DEFAULT
2:  mov ebx, DIRTY_BASE
    add rax, rbx                  # end = base + size
    jnc 3f
    mov rax, -1                   # wrapped: let the RAM clip decide
3:  cmp rax, rdx
    jbe 4f
    mov rax, rdx                  # clip the end to the RAM size
4:  xor ecx, ecx                  # rcx = total pages (0 if end <= base)
    cmp rax, rbx
    jbe 5f
    sub rax, rbx
    shr rax, 12
    mov rcx, rax
5:  mov rax, rcx
    xor edx, edx
    div r14                       # rax = q = pages per vCPU
    mov rbp, rax                  # rbp = pages in this slice
    imul rax, r15                 # rax = index * q
    lea r10, [r14 - 1]
    cmp r15, r10
    jne 6f
    mov rbp, rcx
    sub rbp, rax                  # the last vCPU takes the remainder
6:  shl rax, 12
    add rbx, rax                  # rbx = first page of this slice
    mov r13, qword ptr [PARAM_PASSES]
    mov r12d, 1                   # r12 = pass number p

pass:
    mov r8, rbx                   # r8 = current page
    mov r9, rbp                   # r9 = pages left
    lea r10, [r12 - 1]            # r10 = value the page must still hold
    test r9, r9
    jz 8f
7:  mov rax, qword ptr [r8]
    cmp rax, r10
    jne lost
    mov rax, qword ptr [r8 + 4088]
    cmp rax, r10
    jne lost
    mov qword ptr [r8], r12
    mov qword ptr [r8 + 4088], r12
    add r8, 4096
    dec r9
    jnz 7b
8:  mov eax, r12d
    out PROGRESS_PORT, eax
    inc r12
    dec r13                       # 0 passes wraps: effectively forever
    jnz pass

    lock inc dword ptr [COUNTER]
    test r15, r15
    jnz park
9:  cmp dword ptr [COUNTER], r14d # vCPU 0: wait for every vCPU
    jae 10f
    pause
    jmp 9b
10: xor eax, eax
    jmp exit

# lost: RAX = value found, R10 = value expected, R8 = page.
lost:
    mov r11, rax
    lea rsi, [rip + msg_page]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_want]
    call puts
    mov rax, r10
    call putdec
    lea rsi, [rip + msg_got]
    call puts
    mov rax, r11
    call putdec
    lea rsi, [rip + msg_eol]
    call puts
    mov al, 1
    jmp exit

msg_page: .asciz "dirty: LOST WRITE page="
msg_want: .asciz " want="
msg_got:  .asciz " got="
msg_eol:  .asciz "\r\n"

.include "lib64.inc"

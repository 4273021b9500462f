/*
 * PVH entry of the pcihole scan guest.
 *
 * The loader (QEMU -kernel, or the pcihole VMM) reads the ELF note below,
 * loads the PT_LOAD segments at their physical addresses and jumps to
 * pvh_start in 32-bit protected mode: paging off, flat 4 GiB segments,
 * EBX = physical address of struct hvm_start_info.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .note.Xen, "a", @note
	.p2align 2
	.long	2f - 1f			/* namesz */
	.long	4f - 3f			/* descsz */
	.long	XEN_ELFNOTE_PHYS32_ENTRY	/* type */
1:	.asciz	"Xen"
2:	.p2align 2
3:	.long	pvh_start		/* 32-bit physical entry point */
4:	.p2align 2

	.section .text.entry, "ax", @progbits
	.code32
	.globl	pvh_start
	.type	pvh_start, @function
pvh_start:
	cli
	cld
	movl	%ebx, %esi		/* keep the hvm_start_info pointer */

	/* Zero .bss ourselves (stack included): a loader need not do it. */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb

	movl	$pcihole_stack_top, %esp
	xorl	%ebp, %ebp
	pushl	%esi
	call	pcihole_main		/* returns the status byte in %al */

	outb	%al, $0xf4		/* isa-debug-exit: QEMU exits with (al << 1) | 1 */
	.globl	pcihole_halt
pcihole_halt:
	cli
	hlt
	jmp	pcihole_halt
	.size	pvh_start, . - pvh_start

	.section .bss.stack, "aw", @nobits
	.p2align 4
	.globl	pcihole_stack
pcihole_stack:
	.skip	8192
	.globl	pcihole_stack_top
pcihole_stack_top:

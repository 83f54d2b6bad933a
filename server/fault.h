/* fault.h - what happens when the served model file changes under us.
 *
 * The weights are read straight from a shared read-only mapping of the
 * GGUF file. Truncating that file in place (what `cp new.gguf model.gguf`
 * does) makes every read past the new end a SIGBUS, which would kill the
 * server with a core dump and no word of why. srv_fault_install turns a
 * SIGBUS inside a model mapping into one error log line naming the file
 * and exit status SRV_EXIT_MODEL_CHANGED, which systemd's
 * Restart=on-failure restarts (with the new file). A SIGBUS anywhere else
 * still crashes the process as before.
 */
#ifndef SRV_FAULT_H
#define SRV_FAULT_H

/* Exit status when the model file shrank under its mapping: not 2 (the
 * unit's RestartPreventExitStatus), not 1 (load failures), so it is
 * restarted and recognisable. */
#define SRV_EXIT_MODEL_CHANGED 3

/* Installs the SIGBUS handler (process-wide). Returns 0 or a negative
 * moe_status (MOE_EIO when sigaction fails). Main thread, at startup. */
int srv_fault_install(void);

#endif

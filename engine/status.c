#include "status.h"

#include <stdarg.h>
#include <stdio.h>

const char *moe_strerror(int status) {
    switch (status) {
#define MOE__STATUS_STR(name, code, msg) \
    case (code):                         \
        return msg;
        MOE_STATUS_MAP(MOE__STATUS_STR)
#undef MOE__STATUS_STR
    }
    return "unknown error";
}

const char *moe_status_name(int status) {
    switch (status) {
#define MOE__STATUS_NAME(name, code, msg) \
    case (code):                          \
        return #name;
        MOE_STATUS_MAP(MOE__STATUS_NAME)
#undef MOE__STATUS_NAME
    }
    return "EUNKNOWN";
}

int moe_seterr(char *err, size_t errsz, int status, const char *fmt, ...) {
    if (err && errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsz, fmt, ap);
        va_end(ap);
    }
    return status;
}

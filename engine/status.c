#include "status.h"

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

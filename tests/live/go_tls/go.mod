module gotls

go 1.17
